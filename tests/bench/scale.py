"""Scale-out: 1, 2, 4 and 8 herders sharing one queue on PostgreSQL, in front of 32 stub workers.

Run ``python -m tests.bench.scale``. On loopback it starts ``--workers``
stub workers once (``celery -A tests.bench.stub_worker worker -Q
llama.smollm2 -P threads -c T -n stub<i>@test``: they answer at once, so
only the herders are measured). Then, for every repetition and every
``--herders`` count (interleaved, the order rotated each repetition, so
every count sees the same noise of a shared machine), on a fresh PostgreSQL
database with ``--accounts`` funded accounts: that many herders (``celery -A router
worker -Q herder -c C -n herder<i>@test``, no ``-B``) and exactly one
``celery -A router beat``. The Python client (``Herder(api_key).run(
messages=…, tokens=…).result(timeout)``, its threads spread over the
accounts) keeps ``--inflight`` requests in flight until ``--requests`` have
completed (closed loop), after a warm-up.

``--db-latency-ms L`` puts the database on another machine, in effect: the
herders run ``tests.bench.db_latency``'s app, whose every round trip to
PostgreSQL waits 2 × L ms first, so the herders' throughput is set by their
round trips and the locks they wait on rather than by this machine's cores.
Meanwhile the connections of the run's database that wait on a lock are
sampled (``pg_stat_activity``) every ``LOCK_SAMPLE_S``.

Reported per herder count: completed requests/s and submit→result p50/p95
(medians over the repetitions), the rate against k × one herder's, the
connections waiting on locks (mean, by kind), the herders' CPU per request,
how busy the machine's CPUs were, and the chaos suite's ledger audit
(``tests.chaos.audit``) over every job of every run: nothing lost, nothing
charged twice, books balanced. Writes ``tests/bench/results/scale.md`` (with
``--db-latency-ms``: ``scale-latency.md``) and
prints it.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench import compare
from tests.bench.compare import closed_loop, group_cpu_s, log, percentile

RESULTS = Path(__file__).resolve().parent / "results"
HERDERS = (1, 2, 4, 8)
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
#: Times a request refused with ``NoWorkers`` is sent again (see ``spread_call``).
NO_WORKERS_RETRIES = 5
#: The stub workers' heartbeat period, s: their heartbeats live three periods, long enough to outlast a
#: moment of two saturated cores.
HEARTBEAT_S = 5
#: ``tests.bench.db_latency``'s setting (not imported here: it builds the herder's app).
LATENCY_ENV = "LLAMAS_BENCH_DB_LATENCY_MS"
#: Funded accounts the client's threads are spread over (requesters of a marketplace are many).
ACCOUNTS = 16
#: Seconds between two looks at the connections waiting on locks.
LOCK_SAMPLE_S = 0.01
#: ``pg_stat_activity.wait_event`` of a lock wait, by the kind reported.
LOCK_KINDS = {"advisory": "advisory", "transactionid": "row", "tuple": "row"}
#: How much of a waiting statement the log shows.
STATEMENT_CHARS = 90


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
    #: Mean connections waiting on a lock during each run, by kind (``LOCK_KINDS``, else "other").
    lock_waits: list[dict[str, float]] = field(default_factory=list)

    def cells(self, one: float | None) -> list[str]:
        books = "balanced" if not self.problems else f"**{len(self.problems)} problem(s)**"
        rate = statistics.median(self.rates)
        kinds = sorted({kind for run in self.lock_waits for kind in run})
        waits = " · ".join(f"{kind} {statistics.median(run.get(kind, 0.0) for run in self.lock_waits):.2f}"
                           for kind in kinds) or "0"
        return [str(self.herders), f"{rate:.1f}",
                f"{min(self.rates):.1f}–{max(self.rates):.1f}",
                f"{rate / (self.herders * one):.2f}" if one else "",
                f"{statistics.median(self.p50_ms):.0f}", f"{statistics.median(self.p95_ms):.0f}", waits,
                f"{statistics.median(self.cpu_ms):.1f}", f"{statistics.median(self.busy):.0%}",
                str(self.jobs), str(self.lost), str(self.double_charged), books]


HEADER = ["herders", "completed req/s", "min–max", "÷ (k × 1 herder)", "p50 ms", "p95 ms",
          "waiting on locks (mean connections)", "herder CPU ms/req", "machine CPU busy",
          "jobs audited", "lost", "charged twice", "books"]


class LockWaits:
    """Samples, on a thread, how many connections of one database wait on a lock, by kind."""

    def __init__(self, admin_url: str, database: str) -> None:
        from router.core.db import make_engine

        self.engine = make_engine(admin_url)
        self.database = database
        self.samples = 0
        self.totals: dict[str, int] = {}
        #: Samples of a connection waiting, by kind and the start of the statement that waits.
        self.statements: collections.Counter[tuple[str, str]] = collections.Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        from sqlalchemy import text

        query = text("SELECT wait_event, left(regexp_replace(query, '\\s+', ' ', 'g'), :chars) FROM pg_stat_activity "
                     "WHERE datname = :db AND wait_event_type = 'Lock'")
        with self.engine.connect() as connection:
            while not self._stop.wait(LOCK_SAMPLE_S):
                for event, statement in connection.execute(query, {"db": self.database, "chars": STATEMENT_CHARS}):
                    kind = LOCK_KINDS.get(event, "other")
                    self.totals[kind] = self.totals.get(kind, 0) + 1
                    self.statements[kind, statement] += 1
                self.samples += 1
                connection.rollback()  # a fresh snapshot of the activity next time

    def __enter__(self) -> LockWaits:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()
        self.engine.dispose()

    def means(self) -> dict[str, float]:
        return {kind: total / max(1, self.samples) for kind, total in self.totals.items()}


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
    p.add_argument("--accounts", type=int, default=ACCOUNTS, help="funded accounts the client's threads use")
    p.add_argument("--db-latency-ms", type=float, default=0.0,
                   help="one-way latency added to every round trip between a herder and PostgreSQL")
    p.add_argument("--postgres-url", default=os.environ.get("LLAMAS_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL),
                   help="a PostgreSQL database to connect to; each configuration creates (and drops) a fresh "
                        "database beside it")
    p.add_argument("--round-timeout", type=float, default=600.0, help="seconds one repetition may take")
    p.add_argument("--out", type=Path, default=RESULTS, help="where scale.md (or scale-latency.md) goes")
    return p.parse_args(argv)


def spread_call(keys: list[str], max_tokens: int, refused: list[int]) -> compare.Call:
    """``compare.client_call``, each client thread the requester of one of ``keys`` in turn.

    A request refused with ``NoWorkers`` (on two saturated cores a stub worker's heartbeat can lapse while
    herders start) is sent again, up to ``NO_WORKERS_RETRIES`` times; ``refused`` counts them.
    """
    calls = [compare.client_call(key, max_tokens) for key in keys]

    def call(k: int, i: int) -> tuple[int, str | None]:
        for attempt in range(NO_WORKERS_RETRIES + 1):
            try:
                return calls[k % len(calls)](k, i)
            except Exception as exc:
                if type(exc).__name__ != "NoWorkers" or attempt == NO_WORKERS_RETRIES:
                    raise
                refused.append(i)
                time.sleep(1)
        raise AssertionError("unreachable")

    return call


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
    from sqlalchemy import func, make_url, select

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
        keys = []
        with sessions.begin() as session:
            for i in range(args.accounts):
                bench, api_key = ledger.create_account(session, f"bench{i}", compare.FUNDS)
                # The only tenants: each one's fair share is the whole herd and every minute.
                limits.set_own(session, bench, in_flight=10**6, queued=10**6, requests_per_minute=0,
                               tokens_per_minute=0)
                keys.append(api_key)
        logs = tmp / f"run{run + 1}-herders{n}"
        fleet.clear_broker()
        env = dict(fleet.env, LLAMAS_DATABASE_URL=db_url)
        app = "router"
        if args.db_latency_ms:
            env[LATENCY_ENV], app = str(args.db_latency_ms), "tests.bench.db_latency"
        fleet.start_control(n, args.herder_concurrency, env, logs, app=app)
        window = audit_window(sessions, fleet.r, logs, f"{n} herder(s)")
        refused: list[int] = []
        call = spread_call(keys, args.max_tokens, refused)
        # Warm-up: every herder child builds its service (token counter, engine) on its first task.
        closed_loop(call, 2 * args.inflight, args.inflight, args.round_timeout)
        window.sent(2 * args.inflight)
        groups = [p.proc.pid for p in [*fleet.herders, fleet.beat]]
        cpu_before, (busy_before, total_before) = sum(group_cpu_s(g) for g in groups), cpu_times()
        with LockWaits(args.postgres_url, str(make_url(db_url).database)) as waits:
            wall, samples = closed_loop(call, args.requests, args.inflight, args.round_timeout)
        config.lock_waits.append(waits.means())
        if refused:
            log(f"  {len(refused)} request(s) refused with NoWorkers and sent again")
        for (kind, statement), count in waits.statements.most_common(4):
            log(f"  waiting on {kind} lock in {count / max(1, waits.samples):.2f} connections on average: {statement}")
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
            f"p95 {config.p95_ms[-1]:.0f} ms, lock waits {config.lock_waits[-1]}, "
            f"herder CPU {config.cpu_ms[-1]:.1f} ms/req, machine busy "
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
    herder_app = "tests.bench.db_latency" if args.db_latency_ms else "router"
    one = next((statistics.median(c.rates) * 1.0 for c in configs if c.herders == 1 and c.rates), None)
    far = (f" Every round trip from a herder to PostgreSQL waited {2 * args.db_latency_ms:g} ms "
           f"({args.db_latency_ms:g} ms each way, `tests.bench.db_latency`), as if the database ran on another "
           "machine." if args.db_latency_ms else "")
    cores = os.cpu_count() or 1
    lines = [
        "# Scale-out: several herders sharing one queue on PostgreSQL",
        "",
        f"`{command}` — {when}, {cores} cores ({platform.machine()}), Python {platform.python_version()}, "
        f"PostgreSQL and Redis on loopback. Load average (1 min) {load[0]:.1f} at the start and {load[1]:.1f} "
        f"at the end.{far}",
        "",
        f"- **herd**: {args.workers} stub workers (`celery -A tests.bench.stub_worker worker -Q llama.smollm2 "
        f"-P threads -c {args.worker_threads} -n stub<i>@test`), {args.workers * args.worker_threads} slots; "
        "they answer at once, so only the herders' work is timed. Started once, shared by every run.",
        f"- **herders**: N × `celery -A {herder_app} worker -Q herder -c {args.herder_concurrency} "
        "-n herder<i>@test` "
        "(no `-B`) plus exactly one `celery -A router beat`, started afresh for every run on a fresh PostgreSQL "
        f"database with {args.accounts} funded account(s), the client's threads spread over them.",
        f"- **load**: the Python client, `Herder(api_key).run(messages=…, tokens={args.max_tokens})"
        f".result(timeout)`, a closed loop of {args.inflight} requests in flight until {args.requests} have "
        f"completed, after a warm-up of {2 * args.inflight}. {args.reps} run(s) of every herder count, "
        "interleaved with the order rotated; figures are medians over the runs (and the range of the rate).",
        "- **audit**: `tests.chaos.audit.Scenario` over every job of every run (warm-ups included), after "
        "draining: *lost* = admitted jobs that never ended, or ended `done` without a stored result; "
        "*charged twice* = jobs captured more than once; *books* = `ledger.check` (double entry sums to zero), "
        "no negative balance, every ended job holds nothing in escrow and its charge + refund equals its offer, "
        "no channel delivered twice.",
        "- **÷ (k × 1 herder)**: the rate over k times one herder's (1.00: perfect scaling); **waiting on locks**: "
        "the mean number of the run's database connections waiting on a lock, sampled every "
        f"{LOCK_SAMPLE_S * 1000:g} ms from `pg_stat_activity` (advisory: the claim's model lock or the "
        "near-full queue lock; row: a row another transaction holds, an account or a job).",
        "- **herder CPU ms/req**: CPU of every herder's and beat's process group during a run ÷ its requests; "
        f"**machine CPU busy**: the share of all {cores} cores' time that was busy meanwhile (stub workers, "
        "client, Redis, PostgreSQL and anything else running on the machine share them).",
        "",
        "| " + " | ".join(HEADER) + " |",
        "|" + "---:|" * (len(HEADER) - 1) + "---|",
        *("| " + " | ".join(c.cells(one)) + " |" for c in configs),
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
        env["LLAMAS_HEARTBEAT_INTERVAL_S"] = str(HEARTBEAT_S)
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
    out = args.out / ("scale-latency.md" if args.db_latency_ms else "scale.md")
    out.write_text(text)
    print()
    print(text)
    log(f"wrote {out}")
    if any(c.problems for c in configs):
        raise SystemExit("the audit found problems (see the report)")


if __name__ == "__main__":
    main()
