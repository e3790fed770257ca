"""The herder's own cost, against its targets, before and after a change, in one run.

Run ``python -m tests.bench.herder --base REV`` (``make bench-herder``). For
this checkout, and for the commit ``REV`` exported into a temporary folder
(``git archive``), it starts the same stack from that tree's code: one
herder as the README starts it (``celery -A router worker -Q herder -B``,
its default pool), ``--workers`` stub workers (``tests/bench/stub_worker.py``:
they answer at once, so only the herder's cost is left) on a fresh SQLite
ledger and a fresh Redis database, and measures

- **submit→result**: ``--sequential`` requests one at a time through the
  Python client (``Herder.run(...).result()``), p50 and p95;
- **completed requests/s** with ``--inflight`` requests in flight (closed
  loop) for ``--burst`` requests, and the **CPU per request** of each
  process group over that burst (the herder's main process, pool children
  and beat; the stub workers; this requester);
- **admissions/s** on SQLite, in-process, as that tree's own
  ``python -m tests.bench.admission`` measures them (best of 1 and 2 threads).

The trees run one after the other, the same number of times, interleaved
(``--reps``); medians are reported. Writes ``tests/bench/results/herder.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.compare import SESSION_KEY, choose_redis, group_cpu_s, percentile, session_owner, stop_celery
from tests.processes import ROOT, CeleryProcess

RESULTS = ROOT / "tests" / "bench" / "results" / "herder.md"
#: The issue's targets, on a 2-core machine with the stub worker.
TARGETS = {"herder_cpu_ms": 5.0, "p50_ms": 10.0, "admissions_per_s": 1000.0, "completed_per_s": 200.0}
MESSAGES = [{"role": "user", "content": "Grade the sentiment of this chat message from 1 to 5: what a lovely day"}]
FUNDS = 10**15
READY_TIMEOUT_S = 90.0
#: ``Best admission rate 1,234/s`` in ``tests.bench.admission``'s output.
ADMISSION_RATE = re.compile(r"Best admission rate ([0-9,]+)/s")


@dataclass
class Measured:
    """One tree's figures, a list per measure (one entry per repetition)."""

    label: str
    values: dict[str, list[float]] = field(default_factory=dict)

    def add(self, name: str, value: float) -> None:
        self.values.setdefault(name, []).append(value)

    def median(self, name: str) -> float:
        found = self.values.get(name)
        return statistics.median(found) if found else float("nan")


def export(rev: str, into: Path) -> Path:
    """The files of commit ``rev``, written into ``into``."""
    archive = subprocess.run(["git", "archive", rev], cwd=ROOT, check=True, capture_output=True).stdout
    into.mkdir(parents=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def stack_env(home: Path, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLAMAS_")}
    return env | {"LLAMAS_HOME": str(home), "LLAMAS_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1",
                  # One llama.cpp thread per stub process would be moot (no model); the herder's vocab-only load needs none.
                  "LLAMAS_THREADS": "1",
                  # The bench's one account is the only tenant: its fair share is the whole herd and every
                  # minute (a revision without fair shares ignores these).
                  "LLAMAS_ACCOUNT_MAX_IN_FLIGHT": "1000000", "LLAMAS_ACCOUNT_MAX_QUEUED": "1000000",
                  "LLAMAS_ACCOUNT_REQUESTS_PER_MINUTE": "0", "LLAMAS_ACCOUNT_TOKENS_PER_MINUTE": "0"}


class Stack:
    """Herder (with beat) and stub workers from one tree, on a fresh home and Redis database."""

    def __init__(self, tree: Path, tmp: Path, redis_url: str, workers: int, worker_threads: int,
                 herder_args: list[str] | None = None) -> None:
        import redis

        from llama_tasks import signing

        self.tree, self.tmp = tree, tmp
        home = tmp / "home"
        home.mkdir(parents=True)
        signing.generate_keypair(home)
        signing.generate_keypair(home, "house")
        self.env = stack_env(home, redis_url)
        self.r = redis.Redis.from_url(redis_url)
        # Nothing of the previous stack (queues, heartbeats, results) may reach this one.
        self.r.flushdb()
        self.r.set(SESSION_KEY, session_owner(), ex=3600)
        self.herder = CeleryProcess("router", "herder", "bench-herder", os.cpu_count() or 1, self.env,
                                    tmp / "herder.log", cwd=tree,
                                    extra=["-B", "-s", str(tmp / "beat-schedule"), *(herder_args or [])])
        self.workers = [CeleryProcess("tests.bench.stub_worker", "llama.smollm2", f"stub{i}", worker_threads,
                                      self.env, tmp / f"stub{i}.log", extra=["-P", "threads"], cwd=tree)
                        for i in range(workers)]
        try:
            self.herder.wait_log("ready.", READY_TIMEOUT_S)
            for worker in self.workers:
                worker.wait_ready(self.r, READY_TIMEOUT_S)
            self.api_key = self._account()
        except BaseException:
            self.stop()  # nothing started here may outlive a failed start
            raise

    def _account(self) -> str:
        """The bench's account, made by the tree's own code: its migrations, its home's keys."""
        url = f"sqlite:///{self.tmp / 'home' / 'ledger.db'}"
        # The herder migrates on its first task; the account is needed before.
        script = ("import sys\n"
                  "from router.core import ledger\n"
                  "from router.core.db import make_engine, make_sessionmaker, upgrade\n"
                  "upgrade(sys.argv[1])\n"
                  "engine = make_engine(sys.argv[1])\n"
                  "with make_sessionmaker(engine).begin() as session:\n"
                  "    print(ledger.create_account(session, 'bench', int(sys.argv[2]))[1])\n"
                  "engine.dispose()\n")
        made = subprocess.run([sys.executable, "-c", script, url, str(FUNDS)], cwd=self.tree, env=self.env,
                              capture_output=True, text=True, check=True)
        return made.stdout.strip().splitlines()[-1]

    def cpu(self) -> dict[str, float]:
        own = os.times()
        return {"herder": group_cpu_s(self.herder.proc.pid),
                "workers": sum(group_cpu_s(w.proc.pid) for w in self.workers),
                "requester": own.user + own.system}

    def stop(self) -> None:
        for process in [self.herder, *self.workers]:
            stop_celery(process)  # type: ignore[arg-type]
        self.r.close()


def one_request(herder: Any) -> float:
    started = time.perf_counter()
    handle = herder.run(messages=MESSAGES, tokens=8, temperature=0.0)
    handle.result(timeout=60)
    return time.perf_counter() - started


def burst(herders: list[Any], total: int) -> float:
    """Wall seconds for ``total`` requests, ``len(herders)`` in flight at once."""
    remaining = [total]
    lock = threading.Lock()
    errors: list[BaseException] = []

    def loop(herder: Any) -> None:
        while True:
            with lock:
                if remaining[0] <= 0:
                    return
                remaining[0] -= 1
            try:
                one_request(herder)
            except BaseException as exc:  # reported after the burst
                errors.append(exc)
                return

    threads = [threading.Thread(target=loop, args=(h,)) for h in herders]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]!r}")
    return time.perf_counter() - started


def measure_stack(stack: Stack, out: Measured, args: argparse.Namespace) -> None:
    from router.client import Herder, requester_app

    app = requester_app()
    herders = [Herder(stack.api_key, app=app, redis_url=stack.env["LLAMAS_REDIS_URL"])
               for _ in range(args.inflight)]
    for _ in range(10):  # warm-up: tokenizers loaded, connections open
        one_request(herders[0])
    latencies = [one_request(herders[0]) * 1000 for _ in range(args.sequential)]
    out.add("p50_ms", percentile(latencies, 50))
    out.add("p95_ms", percentile(latencies, 95))
    before = stack.cpu()
    wall = burst(herders, args.burst)
    after = stack.cpu()
    out.add("completed_per_s", args.burst / wall)
    for group in before:
        out.add(f"{group}_cpu_ms", (after[group] - before[group]) * 1000 / args.burst)


def admissions(tree: Path) -> float:
    """The best admissions/s ``tests.bench.admission`` of ``tree`` reports."""
    run = subprocess.run([sys.executable, "-m", "tests.bench.admission", "-n", "600", "--runs", "3",
                          "--threads", "1", "2"], cwd=tree, capture_output=True, text=True, timeout=600)
    found = ADMISSION_RATE.search(run.stdout)
    if not found:
        raise RuntimeError(f"no admission rate in the output of {tree}:\n{run.stdout}\n{run.stderr}")
    return float(found.group(1).replace(",", ""))


def report(trees: list[Measured], args: argparse.Namespace, command: str) -> str:
    rows = [
        ("herder CPU per request, ms", "herder_cpu_ms", "≤", TARGETS["herder_cpu_ms"]),
        ("submit→result p50, ms", "p50_ms", "≤", TARGETS["p50_ms"]),
        ("submit→result p95, ms", "p95_ms", "", None),
        (f"completed requests/s, {args.inflight} in flight", "completed_per_s", "≥", TARGETS["completed_per_s"]),
        ("admissions/s on SQLite (in-process)", "admissions_per_s", "≥", TARGETS["admissions_per_s"]),
        ("stub workers' CPU per request, ms", "workers_cpu_ms", "", None),
        ("requester's CPU per request, ms", "requester_cpu_ms", "", None),
    ]
    head = "| measure | target | " + " | ".join(t.label for t in trees) + " |"
    lines = [
        "# The herder's cost against its targets",
        "",
        f"`{command}` on {datetime.date.today()}, {os.cpu_count()} cores; medians of {args.reps} repetitions, "
        f"the trees interleaved. One herder (`celery -A router worker -Q herder -B`, its default pool), "
        f"{args.workers} stub workers (`-P threads -c {args.worker_threads}`), SQLite ledger; "
        f"{args.sequential} sequential requests for the latencies, bursts of {args.burst} for the rates and CPU.",
        "",
        head,
        "|---|---|" + "---:|" * len(trees),
    ]
    for name, key, op, target in rows:
        cells = []
        for t in trees:
            value = t.median(key)
            met = "" if target is None else (" ✓" if (value <= target if op == "≤" else value >= target) else " ✗")
            cells.append(f"{value:,.1f}{met}")
        lines.append(f"| {name} | {op + ' ' + format(target, ',.0f') if target is not None else ''} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.herder", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", default=None, help="a commit to measure beside this checkout (e.g. HEAD~3)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--worker-threads", type=int, default=8)
    p.add_argument("--inflight", type=int, default=16)
    p.add_argument("--sequential", type=int, default=100)
    p.add_argument("--burst", type=int, default=600)
    p.add_argument("--herder-args", default="", help="more arguments for the herder's celery worker")
    p.add_argument("--no-admissions", action="store_true", help="skip the in-process admission rate")
    args = p.parse_args(argv)
    command = "python -m tests.bench.herder " + " ".join(argv if argv is not None else sys.argv[1:])
    chosen = choose_redis()
    redis_url = chosen.url
    # This process is the requester: its Celery app reads the broker from the settings.
    os.environ["LLAMAS_REDIS_URL"] = redis_url
    with tempfile.TemporaryDirectory(prefix="llamas-herder-bench-") as tmp_name:
        tmp = Path(tmp_name)
        trees = [("this checkout", ROOT)]
        if args.base:
            trees.insert(0, (f"base {args.base}", export(args.base, tmp / "base")))
        measured = {label: Measured(label) for label, _ in trees}
        for rep in range(args.reps):
            for label, tree in trees:
                run_dir = tmp / f"{len(measured[label].values.get('p50_ms', []))}-{label.split()[0]}"
                stack = Stack(tree, run_dir, redis_url, args.workers, args.worker_threads,
                              shlex.split(args.herder_args))
                try:
                    measure_stack(stack, measured[label], args)
                finally:
                    stack.stop()
                if not args.no_admissions:
                    measured[label].add("admissions_per_s", admissions(tree))
                m = measured[label]
                print(f"rep {rep + 1} {label}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in m.values.items()),
                      flush=True)
        text = report(list(measured.values()), args, command)
    chosen.release()
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
