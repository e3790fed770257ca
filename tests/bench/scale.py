"""Scale-out: 1, 2 and 4 herders sharing one queue on PostgreSQL, in front of 32 stub workers.

Run ``python -m tests.bench.scale``. On loopback it starts ``--workers``
stub workers once (``celery -A tests.bench.stub_worker worker -Q
llama.smollm2 -P threads -c T -n stub<i>@test``: they answer at once, so
only the herders are measured). Then, for every repetition and every
``--herders`` count (interleaved, the order rotated each repetition, so
every count sees the same noise of a shared machine), on a fresh PostgreSQL
database with one funded account: that many herders (``celery -A router
worker -Q herder -c C -n herder<i>@test``, no ``-B``) and exactly one
``celery -A router beat``. The Python client (``Herder(api_key).run(
messages=…, tokens=…).result(timeout)``) keeps ``--inflight`` requests in
flight until ``--requests`` have completed (closed loop), after a warm-up.
Reported per herder count: completed requests/s and submit→result p50/p95
(medians over the repetitions), the herders' CPU per request, how busy the
machine's CPUs were, and the chaos suite's ledger audit
(``tests.chaos.audit``) over every job of every run: nothing lost, nothing
charged twice, books balanced. Writes ``tests/bench/results/scale.md`` and
prints it.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench import compare
from tests.bench.compare import closed_loop, group_cpu_s, log, percentile

RESULTS = Path(__file__).resolve().parent / "results"
HERDERS = (1, 2, 4)
WORKERS = 32
#: Task threads of each stub worker (its slots in the herd).
WORKER_THREADS = 2
REQUESTS = 600
INFLIGHT = 32
REPETITIONS = 3
#: Prefork children of each herder: the machine's default on two cores, as ``llamas up`` runs it.
HERDER_CONCURRENCY = 2
MAX_TOKENS = 16
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/test"
#: Machine CPU busy share from which a run says the cores, not the herders, set the rate.
SATURATED = 0.85


@dataclass
class Config:
    """What one herder count measured over its runs, and what their audits found."""

    herders: int
    rates: list[float] = field(default_factory=list)
    p50_ms: list[float] = field(default_factory=list)
    p95_ms: list[float] = field(default_factory=list)
    #: CPU of the herders' and beat's process groups, ms per completed request, per run.
    cpu_ms: list[float] = field(default_factory=list)
    #: Share of the machine's CPU time that was busy during each run (every process, ours or not).
    busy: list[float] = field(default_factory=list)
    jobs: int = 0
    lost: int = 0
    double_charged: int = 0
    problems: list[str] = field(default_factory=list)

    def cells(self) -> list[str]:
        books = "balanced" if not self.problems else f"**{len(self.problems)} problem(s)**"
        return [str(self.herders), f"{statistics.median(self.rates):.1f}",
                f"{min(self.rates):.1f}–{max(self.rates):.1f}",
                f"{statistics.median(self.p50_ms):.0f}", f"{statistics.median(self.p95_ms):.0f}",
                f"{statistics.median(self.cpu_ms):.1f}", f"{statistics.median(self.busy):.0%}",
                str(self.jobs), str(self.lost), str(self.double_charged), books]


HEADER = ["herders", "completed req/s", "min–max", "p50 ms", "p95 ms", "herder CPU ms/req", "machine CPU busy",
          "jobs audited", "lost", "charged twice", "books"]


def cpu_times() -> tuple[int, int]:
    """(busy, total) CPU ticks of the whole machine so far, from ``/proc/stat``."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--herders", type=int, nargs="+", default=list(HERDERS), help="herder counts to measure")
    p.add_argument("--workers", type=int, default=WORKERS, help="stub workers (each its own process)")
    p.add_argument("--worker-threads", type=int, default=WORKER_THREADS, help="task threads of each stub worker")
    p.add_argument("--herder-concurrency", type=int, default=HERDER_CONCURRENCY,
                   help="prefork children of each herder (-c)")
    p.add_argument("--requests", type=int, default=REQUESTS, help="completed requests per repetition")
    p.add_argument("--inflight", type=int, default=INFLIGHT, help="requests in flight (closed loop)")
    p.add_argument("--reps", type=int, default=REPETITIONS,
                   help="runs of every herder count, interleaved (medians reported)")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="max_tokens of every request (priced, "
                   "not generated: the stub answers at once)")
    p.add_argument("--postgres-url", default=os.environ.get("LLAMAS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
                   help="a PostgreSQL database to connect to; each configuration creates (and drops) a fresh "
                        "database beside it")
    p.add_argument("--round-timeout", type=float, default=600.0, help="seconds one repetition may take")
    p.add_argument("--out", type=Path, default=RESULTS, help="where scale.md goes")
    return p.parse_args(argv)


def fresh_database(postgres_url: str) -> str:
    """A new, empty database on the server of ``postgres_url`` (``tests.stack``'s, which reads the URL from the env)."""
    import psycopg

    from tests.stack import postgres_database

    os.environ["LLAMAS_TEST_POSTGRES_URL"] = postgres_url
    try:
        url = postgres_database()
    except psycopg.OperationalError as exc:
        raise SystemExit(f"no PostgreSQL answers at {postgres_url} ({exc}); pass --postgres-url") from None
    assert url is not None  # with the URL configured, a server that does not answer raises instead
    return url


def measure(args: argparse.Namespace, fleet: Any, config: Config, run: int, tmp: Path) -> None:
    """One run of a herder count on its own fresh database: start, warm up, measure, audit, stop."""
    from sqlalchemy import func, select

    from router.core import ledger, limits
    from router.core.db import make_engine, make_sessionmaker, upgrade
    from router.core.models import JobRow
    from tests.bench.fleet import audit_window
    from tests.stack import drop_postgres_database

    n = config.herders
    db_url = fresh_database(args.postgres_url)
    sessions = None
    try:
        upgrade(db_url)
        sessions = make_sessionmaker(make_engine(db_url))
        with sessions.begin() as session:
            bench, api_key = ledger.create_account(session, "bench", compare.FUNDS)
            # The only tenant: its fair share is the whole herd and every minute.
            limits.set_own(session, bench, in_flight=10**6, queued=10**6, requests_per_minute=0,
                           tokens_per_minute=0)
        logs = tmp / f"run{run + 1}-herders{n}"
        fleet.clear_broker()
        fleet.start_control(n, args.herder_concurrency, dict(fleet.env, LLAMAS_DATABASE_URL=db_url), logs)
        window = audit_window(sessions, fleet.r, logs, f"{n} herder(s)")
        call = compare.client_call(api_key, args.max_tokens)
        # Warm-up: every herder child builds its service (token counter, engine) on its first task.
        closed_loop(call, 2 * args.inflight, args.inflight, args.round_timeout)
        window.sent(2 * args.inflight)
        groups = [p.proc.pid for p in [*fleet.herders, fleet.beat]]
        cpu_before, (busy_before, total_before) = sum(group_cpu_s(g) for g in groups), cpu_times()
        wall, samples = closed_loop(call, args.requests, args.inflight, args.round_timeout)
        cpu_s, (busy_after, total_after) = sum(group_cpu_s(g) for g in groups) - cpu_before, cpu_times()
        window.sent(args.requests)
        latencies = [s.latency_s * 1000 for s in samples]
        config.rates.append(args.requests / wall)
        config.p50_ms.append(percentile(latencies, 50))
        config.p95_ms.append(percentile(latencies, 95))
        config.cpu_ms.append(cpu_s * 1000 / args.requests)
        config.busy.append((busy_after - busy_before) / max(1, total_after - total_before))
        row, problems = window.finish()
        with sessions.begin() as session:
            jobs = session.scalar(select(func.count()).select_from(JobRow)) or 0
        config.jobs += jobs
        config.lost += row.lost
        config.double_charged += row.double_charged
        config.problems += [f"run {run + 1}: {p}" for p in problems]
        log(f"run {run + 1}, {n} herder(s): {config.rates[-1]:.1f} req/s, p50 {config.p50_ms[-1]:.0f} ms, "
            f"p95 {config.p95_ms[-1]:.0f} ms, herder CPU {config.cpu_ms[-1]:.1f} ms/req, machine busy "
            f"{config.busy[-1]:.0%}; audit of {jobs} jobs: lost {row.lost}, charged twice {row.double_charged}, "
            f"problems {problems or 'none'}")
    finally:
        fleet.stop_control()
        if sessions is not None:
            sessions.kw["bind"].dispose()
        drop_postgres_database(db_url)


def report(args: argparse.Namespace, command: str, configs: list[Config], started: float,
           load: tuple[float, float]) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cores = os.cpu_count() or 1
    lines = [
        "# Scale-out: several herders sharing one queue on PostgreSQL",
        "",
        f"`{command}` — {when}, {cores} cores ({platform.machine()}), Python {platform.python_version()}, "
        f"PostgreSQL and Redis on loopback. Load average (1 min) {load[0]:.1f} at the start and {load[1]:.1f} "
        "at the end.",
        "",
        f"- **herd**: {args.workers} stub workers (`celery -A tests.bench.stub_worker worker -Q llama.smollm2 "
        f"-P threads -c {args.worker_threads} -n stub<i>@test`), {args.workers * args.worker_threads} slots; "
        "they answer at once, so only the herders' work is timed. Started once, shared by every run.",
        f"- **herders**: N × `celery -A router worker -Q herder -c {args.herder_concurrency} -n herder<i>@test` "
        "(no `-B`) plus exactly one `celery -A router beat`, started afresh for every run on a fresh PostgreSQL "
        "database with one funded account.",
        f"- **load**: the Python client, `Herder(api_key).run(messages=…, tokens={args.max_tokens})"
        f".result(timeout)`, a closed loop of {args.inflight} requests in flight until {args.requests} have "
        f"completed, after a warm-up of {2 * args.inflight}. {args.reps} run(s) of every herder count, "
        "interleaved with the order rotated; figures are medians over the runs (and the range of the rate).",
        "- **audit**: `tests.chaos.audit.Scenario` over every job of every run (warm-ups included), after "
        "draining: *lost* = admitted jobs that never ended, or ended `done` without a stored result; "
        "*charged twice* = jobs captured more than once; *books* = `ledger.check` (double entry sums to zero), "
        "no negative balance, every ended job holds nothing in escrow and its charge + refund equals its offer, "
        "no channel delivered twice.",
        "- **herder CPU ms/req**: CPU of every herder's and beat's process group during a run ÷ its requests; "
        f"**machine CPU busy**: the share of all {cores} cores' time that was busy meanwhile (stub workers, "
        "client, Redis, PostgreSQL and anything else running on the machine share them).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---:|" * (len(HEADER) - 1) + "---|",
        *("| " + " | ".join(c.cells()) + " |" for c in configs),
        "",
    ]
    busy = min(statistics.median(c.busy) for c in configs)
    if busy >= SATURATED and len(configs) > 1:
        first, last = configs[0], configs[-1]
        lines += [
            f"Every run kept the machine's CPUs at least {busy:.0%} busy: the herders share the same {cores} "
            "cores with the stub workers, the client, Redis and PostgreSQL, so more herders cannot complete more "
            f"requests here (herder CPU per request: {statistics.median(first.cpu_ms):.1f} ms with "
            f"{first.herders}, {statistics.median(last.cpu_ms):.1f} ms with {last.herders}). What such a run "
            f"shows is that {first.herders} to {last.herders} herders on one queue stay correct under load; a "
            "throughput gain needs herders on cores of their own.",
            "",
        ]
    for c in configs:
        if c.problems:
            lines += [f"Audit problems with {c.herders} herder(s):", "", *(f"- {p}" for p in c.problems), ""]
    lines += [f"Whole run: {time.time() - started:.0f}s.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m tests.bench.scale" + (" " + shlex.join(given) if given else "")
    started, load_start = time.time(), os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="llamas-scale-"))
    redis_handle = compare.choose_redis()
    log(f"redis {redis_handle.url}; logs in {tmp}")
    configs: list[Config] = []
    fleet = None
    try:
        env = compare.configure(tmp, redis_handle.url)  # LLAMAS_* of this process and the children
        from tests.bench.fleet import Fleet  # imports router: only once LLAMAS_* is set

        fleet = Fleet(env, tmp)
        fleet.clear_broker()
        log(f"starting {args.workers} stub workers")
        fleet.start_workers(args.workers, args.worker_threads)
        log(f"{len(fleet.workers)} stub workers beat")
        configs = [Config(n) for n in args.herders]
        for run in range(args.reps):
            # Interleaved, the order rotated each time: every count sees the same noise of a shared machine.
            for config in configs[run % len(configs):] + configs[:run % len(configs)]:
                measure(args, fleet, config, run, tmp)
    finally:
        if fleet is not None:
            fleet.stop()
        redis_handle.release()
    text = report(args, command, configs, started, (load_start, os.getloadavg()[0]))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "scale.md").write_text(text)
    print()
    print(text)
    log(f"wrote {args.out / 'scale.md'}")
    if any(c.problems for c in configs):
        raise SystemExit("the audit found problems (see the report)")


if __name__ == "__main__":
    main()
