"""How many admissions a second the herder takes on a SQLite ledger.

Run ``python -m tests.bench.admission``. Each admission is what
``HerderService.submit`` does before it dispatches: one transaction from the
herder's own sessionmaker around ``admission.admit``, with the real
vocab-only tokenizer quoting the prompt; a second row adds describing the
new job in the same transaction, as ``submit`` does (its claim and dispatch
need Redis and are left out). Every run gets a fresh ledger file with one funded account; the
table gives the median of the runs, with 1, 2 and 4 threads, and, as the
floor the ledger itself sets, as many bare ``ledger.hold`` transactions.
``--profile`` adds where a single thread's time goes; ``--pragma`` and the
other flags try changes, to size proposals. The issue's target is 1,000
admissions a second on 2 cores.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.orm import Session, sessionmaker

from router.core import ledger, views
from router.core.admission import admit, price
from router.core.db import make_engine, make_sessionmaker, upgrade
from router.core.models import Account
from router.core.request import Submission, as_job
from router.core.settings import HerderSettings
from router.herder.tokens import TokenCounter

#: Admissions per run (split between the threads).
DEFAULT_N = 1_000
DEFAULT_RUNS = 5
DEFAULT_THREADS = (1, 2, 4)
#: The issue's target, in admissions a second.
TARGET_PER_S = 1_000
#: Enough that no run is ever refused for want of money, in the smallest unit.
FUNDS = 10**15
#: A typical short chat request, like the agent's sentiment question.
MESSAGE = "Grade the sentiment of this chat message from -1 to 1: {text}"
TEXTS = (
    "the new release is fantastic, buying more",
    "honestly this looks like a rug pull, selling everything",
    "meh, sideways all week",
    "to the moon!!! best team in the space",
)


@dataclass(frozen=True)
class Options:
    """Changes to try against the herder as it is (none by default), to size proposals."""

    #: Extra ``PRAGMA``s on every connection, e.g. ``synchronous=NORMAL``.
    pragmas: tuple[str, ...] = ()
    #: Queue write transactions on an in-process lock instead of SQLite's busy handler.
    writer_lock: bool = False

    def describe(self) -> str:
        parts = [f"PRAGMA {p}" for p in self.pragmas]
        parts += ["in-process writer lock"] * self.writer_lock
        return ", ".join(parts) or "the herder as it is"


@dataclass(frozen=True)
class Ledger:
    """A fresh ledger file with one funded requester."""

    settings: HerderSettings
    engine: Engine
    sessions: sessionmaker[Session]
    api_key: str
    account: Account
    lock: threading.Lock | None


@contextmanager
def fresh_ledger(root: Path, options: Options) -> Iterator[Ledger]:
    home = Path(tempfile.mkdtemp(dir=root))
    url = f"sqlite:///{home / 'ledger.db'}"
    # No queue limit, for the service or the one account: the queue only grows here, nothing is dispatched.
    settings = HerderSettings(home=home, database_url=url, max_queue=10**9, account_max_queued=10**9)
    upgrade(url)
    engine = make_engine(url)
    if options.pragmas:

        @event.listens_for(engine, "connect")
        def _extra_pragmas(dbapi_connection: Any, _record: Any) -> None:
            for pragma in options.pragmas:
                dbapi_connection.execute(f"PRAGMA {pragma}")

    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        account, api_key = ledger.create_account(session, "bench", deposit=FUNDS)
    lock = threading.Lock() if options.writer_lock else None
    try:
        yield Ledger(settings, engine, sessions, api_key, account, lock)
    finally:
        engine.dispose()


def submission(i: int) -> Submission:
    text = TEXTS[i % len(TEXTS)]
    return Submission(messages=[{"role": "user", "content": MESSAGE.format(text=f"{text} #{i}")}],
                      max_tokens=16, temperature=0.0)


@contextmanager
def transaction(book: Ledger) -> Iterator[Session]:
    """A write transaction, as the herder opens one (behind the writer lock if tried)."""
    if book.lock is None:
        with book.sessions.begin() as session:
            yield session
        return
    with book.lock, book.sessions.begin() as session:
        yield session


def admit_one(book: Ledger, counter: TokenCounter, i: int) -> None:
    """One admission, as ``HerderService.submit`` runs it (without the dispatch after)."""
    sub = submission(i)
    priced = price(book.settings, counter, sub)  # outside the write transaction, as the service counts
    with transaction(book) as session:
        admit(session, book.settings, priced, book.api_key, sub, time.time())


def admit_and_describe(book: Ledger, counter: TokenCounter, i: int) -> None:
    """``admit_one`` plus describing the new job in the same transaction, as ``submit`` answers it."""
    sub = submission(i)
    priced = price(book.settings, counter, sub)
    with transaction(book) as session:
        row, _ = admit(session, book.settings, priced, book.api_key, sub, time.time())
        views.describe_row(session, row)


def hold_one(book: Ledger, counter: TokenCounter, i: int) -> None:
    """The floor: one transaction that only moves money into escrow."""
    with transaction(book) as session:
        ledger.hold(session, book.account, 1, uuid.uuid4().hex)


Operation = Callable[[Ledger, TokenCounter, int], None]


def timed_run(book: Ledger, counter: TokenCounter, op: Operation, n: int, threads: int) -> tuple[float, float]:
    """Wall and CPU seconds (of this process) for ``n`` operations over ``threads`` threads started together."""
    start = threading.Barrier(threads + 1)
    errors: list[BaseException] = []

    def worker(first: int) -> None:
        start.wait()
        try:
            for i in range(first, n, threads):
                op(book, counter, i)
        except BaseException as exc:  # noqa: BLE001 - re-raised after the run
            errors.append(exc)

    pool = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for thread in pool:
        thread.start()
    start.wait()
    began, began_cpu = time.perf_counter(), time.process_time()
    for thread in pool:
        thread.join()
    elapsed, cpu = time.perf_counter() - began, time.process_time() - began_cpu
    if errors:
        raise errors[0]
    return elapsed, cpu


def median_rate(root: Path, counter: TokenCounter, op: Operation, n: int, threads: int, runs: int,
                options: Options) -> tuple[float, float, float]:
    """Over ``runs`` fresh ledgers: median operations a second, median CPU ms per operation, median s per run."""
    walls, cpus = [], []
    for _ in range(runs):
        with fresh_ledger(root, options) as book:
            wall, cpu = timed_run(book, counter, op, n, threads)
        walls.append(wall)
        cpus.append(cpu)
    median_s = statistics.median(walls)
    return n / median_s, 1000 * statistics.median(cpus) / n, median_s


def profile(root: Path, counter: TokenCounter, n: int, top: int, options: Options) -> str:
    """Where one thread's admissions spend their time: top functions by own time, and by total."""
    with fresh_ledger(root, options) as book:
        profiler = cProfile.Profile()
        # In this thread: cProfile sees only the thread that enabled it.
        profiler.enable()
        for i in range(n):
            admit_one(book, counter, i)
        profiler.disable()
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out).strip_dirs()
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top * 3)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.admission", description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=DEFAULT_N, help="operations per run")
    parser.add_argument("--runs", type=int, default=DEFAULT_RUNS, help="runs per row; the median is shown")
    parser.add_argument("--threads", type=int, nargs="+", default=list(DEFAULT_THREADS))
    parser.add_argument("--pragma", action="append", default=[],
                        help="try an extra SQLite pragma per connection, e.g. synchronous=NORMAL (repeatable)")
    parser.add_argument("--writer-lock", action="store_true",
                        help="try queueing write transactions on an in-process lock")
    parser.add_argument("--profile", action="store_true", help="also profile one thread's admissions")
    parser.add_argument("--top", type=int, default=10, help="functions shown by --profile")
    args = parser.parse_args(argv)
    options = Options(tuple(args.pragma), args.writer_lock)

    with tempfile.TemporaryDirectory(prefix="llamas-bench-") as tmp:
        root = Path(tmp)
        counter = TokenCounter(root / "models.json")  # no such file: the built-in models
        counter.prompt_tokens(as_job("warmup", 0, submission(0).generation(), 0.0, 0.0))  # load the vocab untimed
        print(f"SQLite admissions: n={args.n} per run, median of {args.runs} runs, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {options.describe()}")
        print()
        print("| operation | threads | per second | wall ms per op | CPU ms per op | s per run |")
        print("|---|---:|---:|---:|---:|---:|")
        rates: dict[tuple[str, int], float] = {}
        operations: tuple[tuple[str, Operation], ...] = (
            ("admit", admit_one),
            ("admit + describe (as submit)", admit_and_describe),
            ("bare ledger.hold", hold_one),
        )
        for name, op in operations:
            for threads in args.threads:
                rate, cpu_ms, median_s = median_rate(root, counter, op, args.n, threads, args.runs, options)
                rates[name, threads] = rate
                print(f"| {name} | {threads} | {rate:,.0f} | {1000 / rate:.2f} | {cpu_ms:.2f} | {median_s:.2f} |",
                      flush=True)
        best = max(rate for (name, _), rate in rates.items() if name == "admit")
        print()
        verdict = "meets" if best >= TARGET_PER_S else "is below"
        print(f"Best admission rate {best:,.0f}/s {verdict} the target of {TARGET_PER_S:,}/s.")
        if args.profile:
            print()
            print(profile(root, counter, args.n, args.top, options))


if __name__ == "__main__":
    main()
