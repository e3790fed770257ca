"""Redis commands, bytes and CPU per request, and database round trips per request, counted on a live stack.

Run ``python -m tests.bench.redis_ops`` (about a minute). It starts a
``redis-server`` of its own on a free port (nothing else talks to it, so
every command it counts is the stack's), a fresh PostgreSQL database, one
herder (``celery -A tests.bench.sql_count worker -Q herder -c 2``: the
herder's app with its database round trips counted) with one ``celery -A
router beat``, one stub worker (``tests.bench.stub_worker``, ``-P threads``:
answers at once, no model) and the gateway (``uvicorn
tests.bench.sql_count:gateway``). After a warm-up it reads, before and after
each phase, Redis's ``INFO commandstats`` and ``INFO stats``
(``total_net_input_bytes``, ``total_net_output_bytes``), the CPU time of
every process (Redis, herder with beat, gateway, stub worker, this
requester, the PostgreSQL backends of the run's database) and the herder's
and gateway's SQL round trips (``tests.bench.sql_count``). Phases:

- **idle**: ``--idle-s`` seconds with no request: the background (heartbeats,
  ticks, Celery's polling of its queues, the result reader's blocking read),
  per second; the request phases are reported with it subtracted;
- **client**: ``--requests`` requests through the Python client
  (``Herder(api_key).run(messages=…, tokens=…).result()``), ``--inflight``
  in flight;
- **gateway**: the same through ``POST /v1/chat/completions`` (not streamed);
- **gateway, N keys**: the gateway again once the herd read has been timed
  with the largest ``--keyspace`` filler keys in the database (below), as if
  Redis held many requests' results: what the herd read's ``SCAN`` costs a
  live stack.

Then the token stream, which the stub worker does not write: ``--steps``
engine steps of ``--sequences`` sequences, each step one pipelined round trip
of one ``XADD`` per sequence (as ``llama_tasks.stream.TokenPipe`` sends
them), then each stream read one event at a time with ``XREAD`` (as a
follower reads a step's token): Redis's CPU and bytes per token written and
read. And the herd read (``llama_tasks.heartbeat.read_herd``) timed with
``--keyspace`` filler keys in the database. Writes ``tests/bench/results/redis_ops.md`` and prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench import compare, sql_count
from tests.bench.compare import closed_loop, group_cpu_s, log, percentile
from tests.bench.peers import Server, free_port
from tests.processes import poll

RESULTS = Path(__file__).resolve().parent / "results" / "redis_ops.md"
REQUESTS = 200
INFLIGHT = 8
IDLE_S = 10.0
MAX_TOKENS = 16
WORKER_THREADS = 8
#: Prefork children of the herder, as ``llamas up`` runs it on two cores.
HERDER_CONCURRENCY = 2
#: The token stream's shape: sequences of one worker's engine, and steps of each.
SEQUENCES = 64
STEPS = 200
#: A token event as ``StreamWriter.token`` writes it (a word-piece of text).
TOKEN_ENTRY = {"event": "token", "attempt": "1", "text": " word", "index": "0"}
#: Commands this bench itself sends to read the counters (not the stack's).
OWN_COMMANDS = ("info", "dbsize", "ping", "client|setname", "client|setinfo", "hello")


@dataclass
class Snapshot:
    """Every counter at one moment."""

    at: float
    commands: dict[str, int]
    usec: dict[str, int]
    net_in: int
    net_out: int
    cpu: dict[str, float]
    sql: dict[str, int]
    memory: int
    keys: int


@dataclass
class Phase:
    """What one phase added to every counter, the idle background not yet subtracted."""

    name: str
    requests: int
    wall_s: float
    commands: dict[str, float] = field(default_factory=dict)
    usec: dict[str, float] = field(default_factory=dict)
    net_in: float = 0.0
    net_out: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)
    sql: dict[str, float] = field(default_factory=dict)
    #: The requester's median wait for its answer (set by ``run``).
    p50_ms: float = 0.0
    #: Redis's ``used_memory`` and key count: what a request leaves behind until its keys expire.
    memory: float = 0.0
    keys: float = 0.0

    @classmethod
    def between(cls, name: str, requests: int, a: Snapshot, b: Snapshot, info_bytes: tuple[int, int]) -> Phase:
        def delta(x: dict[str, Any], y: dict[str, Any]) -> dict[str, Any]:
            return {k: y.get(k, 0) - x.get(k, 0) for k in set(x) | set(y) if y.get(k, 0) != x.get(k, 0)}

        # The reading of ``a`` itself went over the wire after ``a``'s byte counters were taken.
        return cls(name, requests, b.at - a.at, delta(a.commands, b.commands), delta(a.usec, b.usec),
                   b.net_in - a.net_in - info_bytes[0], b.net_out - a.net_out - info_bytes[1],
                   delta(a.cpu, b.cpu), delta(a.sql, b.sql), memory=b.memory - a.memory, keys=b.keys - a.keys)

    def per_request(self, idle: Phase | None) -> Phase:
        """Each counter ÷ requests, after taking away what ``idle`` added in as many seconds."""
        scale = self.wall_s / idle.wall_s if idle else 0.0

        def net(mine: dict[str, Any], theirs: dict[str, Any]) -> dict[str, float]:
            keys = set(mine) | set(theirs)
            return {k: (mine.get(k, 0) - scale * theirs.get(k, 0)) / self.requests for k in keys}

        none = Phase("", 1, 1.0)
        other = idle or none
        return Phase(self.name, 1, self.wall_s / self.requests,
                     {k: round(v, 2) for k, v in net(self.commands, other.commands).items()},
                     {k: round(v, 1) for k, v in net(self.usec, other.usec).items()},
                     (self.net_in - scale * other.net_in) / self.requests,
                     (self.net_out - scale * other.net_out) / self.requests,
                     net(self.cpu, other.cpu), net(self.sql, other.sql),
                     # Not net of idle: what the idle phase's keys freed or left is no rate.
                     memory=self.memory / self.requests, keys=self.keys / self.requests, p50_ms=self.p50_ms)


class OwnRedis:
    """A ``redis-server`` on a free loopback port, no persistence, in a folder of its own."""

    def __init__(self, tmp: Path) -> None:
        import redis

        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        tmp.mkdir(parents=True, exist_ok=True)
        self.log = open(tmp / "redis.log", "wb")  # noqa: SIM115 (open for the server's life; closed in stop)
        self.proc = subprocess.Popen(["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no", "--dir", str(tmp),
                                      # DEBUG POPULATE fills the keyspace for ``herd_read``.
                                      "--enable-debug-command", "local"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.r = redis.Redis.from_url(self.url)

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}")
            with contextlib.suppress(redis.RedisError):
                return bool(self.r.ping())
            return False

        if not poll(answers, 10.0, every_s=0.05):
            raise TimeoutError("redis-server did not answer")

    def cpu_s(self) -> float:
        """Redis's own CPU seconds (``getrusage``, in µs: finer than ``/proc``'s 10 ms ticks)."""
        cpu = self.r.info("cpu")
        return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"])

    def stop(self) -> None:
        self.r.close()
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.log.close()


def settled(sessions: Any, timeout_s: float = 60.0) -> None:
    """Wait until every job has ended and been delivered: asked of the ledger, not of Redis, whose
    commands are what this bench counts."""
    from sqlalchemy import func, or_, select

    from router.core.models import OPEN_STATES, JobRow

    def done() -> bool:
        with sessions() as session:
            left = session.scalar(select(func.count()).select_from(JobRow).where(
                or_(JobRow.state.in_(OPEN_STATES), JobRow.delivery_due.is_(True))))
        return left == 0

    if not poll(done, timeout_s, every_s=0.1):
        raise TimeoutError(f"jobs still open or undelivered after {timeout_s}s")


def backend_cpu_s(sessions: Any, database: str) -> float:
    """CPU seconds so far of the PostgreSQL backends connected to ``database`` (from ``/proc``)."""
    from sqlalchemy import text

    with sessions() as session:
        pids = [p for (p,) in session.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = :d "
                                                   "AND pid <> pg_backend_pid()"), {"d": database})]
    ticks = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def commandstats(r: Any) -> tuple[dict[str, int], dict[str, int]]:
    calls, usec = {}, {}
    for key, stats in r.info("commandstats").items():
        name = key.removeprefix("cmdstat_")
        if name not in OWN_COMMANDS:
            calls[name], usec[name] = int(stats["calls"]), int(stats["usec"])
    return calls, usec


def take(server: OwnRedis, cpu: Callable[[], dict[str, float]], counts_dir: Path) -> Snapshot:
    calls, usec = commandstats(server.r)
    stats = server.r.info("stats")
    return Snapshot(time.perf_counter(), calls, usec, int(stats["total_net_input_bytes"]),
                    int(stats["total_net_output_bytes"]), cpu(), sql_count.read(counts_dir),
                    int(server.r.info("memory")["used_memory"]), int(server.r.dbsize()))


def info_cost(server: OwnRedis, cpu: Callable[[], dict[str, float]], counts_dir: Path) -> tuple[int, int]:
    """Bytes in and out that one ``take`` adds to Redis's counters by itself (the median of 5)."""
    seen = [take(server, cpu, counts_dir) for _ in range(6)]
    ins = sorted(b.net_in - a.net_in for a, b in zip(seen, seen[1:], strict=False))
    outs = sorted(b.net_out - a.net_out for a, b in zip(seen, seen[1:], strict=False))
    return ins[2], outs[2]


def token_stream(server: OwnRedis, sequences: int, steps: int) -> dict[str, float]:
    """Redis's CPU µs and bytes per token event written (pipelined per step) and read (``XREAD``, one each)."""
    r = server.r
    streams = [f"llamas:stream:bench-{i}" for i in range(sequences)]
    found: dict[str, float] = {}

    def measured(kind: str, body: Callable[[], None], events: int) -> None:
        cpu0, s0 = server.cpu_s(), r.info("stats")
        calls0, usec0 = commandstats(r)
        body()
        cpu1, s1 = server.cpu_s(), r.info("stats")
        calls1, usec1 = commandstats(r)
        found[f"{kind} CPU µs"] = (cpu1 - cpu0) * 1e6 / events
        found[f"{kind} command µs"] = (sum(usec1.values()) - sum(usec0.values())) / events
        found[f"{kind} commands"] = (sum(calls1.values()) - sum(calls0.values())) / events
        found[f"{kind} bytes in"] = (s1["total_net_input_bytes"] - s0["total_net_input_bytes"]) / events
        found[f"{kind} bytes out"] = (s1["total_net_output_bytes"] - s0["total_net_output_bytes"]) / events

    def write() -> None:
        for _ in range(steps):
            pipe = r.pipeline(transaction=False)
            for stream in streams:
                pipe.xadd(stream, TOKEN_ENTRY)  # type: ignore[arg-type]
            pipe.execute()

    def read() -> None:
        last = dict.fromkeys(streams, "0-0")
        for _ in range(steps):
            pipe = r.pipeline(transaction=False)
            for stream in streams:
                pipe.xread({stream: last[stream]}, count=1)
            for stream, reply in zip(streams, pipe.execute(), strict=True):
                last[stream] = reply[0][1][-1][0]

    measured("write", write, sequences * steps)
    measured("read", read, sequences * steps)
    r.delete(*streams)
    return found


def key_kinds(r: Any) -> dict[str, tuple[int, float]]:
    """Every key by kind (its name with ids cut off): how many, and the longest TTL left of them, s."""
    found: dict[str, tuple[int, float]] = {}
    for raw in r.scan_iter(count=1000):
        name = raw.decode()
        kind = re.sub(r"[0-9a-f]{8}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{4}-?[0-9a-f]{12}.*$", "<id>", name)
        ttl = r.ttl(raw)
        n, longest = found.get(kind, (0, -2.0))
        found[kind] = (n + 1, max(longest, ttl))
    return found


def herd_read(server: OwnRedis, sizes: list[int]) -> list[tuple[int, int, float, float]]:
    """``read_herd`` (a heartbeat ``SCAN`` over the whole keyspace) with ``sizes`` filler keys in Redis.

    Returns, per size: keys in the database, ``SCAN`` calls one read makes, Redis's CPU ms and the wall ms
    of one read (the best of 3).
    """
    from llama_tasks.heartbeat import read_herd

    r, found = server.r, []
    for size in sizes:
        r.execute_command("DEBUG", "POPULATE", size, "bench:filler", 100)
        calls0 = commandstats(r)[0].get("scan", 0)
        cpu, wall = [], []
        for _ in range(3):
            cpu0, t0 = server.cpu_s(), time.perf_counter()
            read_herd(r)
            wall.append(time.perf_counter() - t0)
            cpu.append(server.cpu_s() - cpu0)
        scans = (commandstats(r)[0].get("scan", 0) - calls0) // 3
        found.append((int(r.dbsize()), scans, min(cpu) * 1000, min(wall) * 1000))
    return found  # the fillers go with the server


def setup_ledger(db_url: str) -> tuple[Any, str]:
    from router.core import ledger, limits
    from router.core.db import make_engine, make_sessionmaker, upgrade

    upgrade(db_url)
    sessions = make_sessionmaker(make_engine(db_url))
    with sessions.begin() as session:
        bench, api_key = ledger.create_account(session, "bench", compare.FUNDS)
        # The only tenant: its fair share is the whole herd and every minute.
        limits.set_own(session, bench, in_flight=10**6, queued=10**6, requests_per_minute=0, tokens_per_minute=0)
    return sessions, api_key


@dataclass
class Extra:
    """What the end of a run finds: clients connected, the keys the requests left, the herd read's cost."""

    connected: int
    kinds: dict[str, tuple[int, float]]
    herd: list[tuple[int, int, float, float]]


def run(args: argparse.Namespace, tmp: Path) -> tuple[list[Phase], Phase, dict[str, float], Extra]:
    from sqlalchemy import make_url

    from tests.bench.scale import fresh_database
    from tests.stack import drop_postgres_database

    server = OwnRedis(tmp / "redis")
    counts_dir = tmp / "sql"
    fleet = gateway = sessions = None
    db_url = fresh_database(args.postgres_url)
    try:
        env = compare.configure(tmp, server.url)
        os.environ["LLAMAS_DATABASE_URL"] = db_url
        env |= {"LLAMAS_DATABASE_URL": db_url, sql_count.COUNT_DIR_ENV: str(counts_dir)}
        sessions, api_key = setup_ledger(db_url)
        from tests.bench.fleet import Fleet  # imports router: only once LLAMAS_* is set

        fleet = Fleet(env, tmp)
        fleet.start_workers(1, args.worker_threads)
        fleet.start_control(1, HERDER_CONCURRENCY, env, tmp / "control", app="tests.bench.sql_count")
        port = free_port()
        gateway = Server("gateway", [sys.executable, "-m", "uvicorn", "tests.bench.sql_count:gateway",
                                     "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"],
                         port, env, tmp / "gateway.log", "/health")
        log(f"stack up: redis {server.url}, database {make_url(db_url).database}")
        database = str(make_url(db_url).database)
        control = [p.proc.pid for p in [*fleet.herders, fleet.beat] if p is not None]
        gw, workers = gateway.proc.pid, [w.proc.pid for w in fleet.workers]

        def cpu() -> dict[str, float]:
            own = os.times()
            return {"redis": server.cpu_s(), "herder": sum(group_cpu_s(g) for g in control),
                    "gateway": group_cpu_s(gw), "worker": sum(group_cpu_s(g) for g in workers),
                    "requester": own.user + own.system, "postgres": backend_cpu_s(sessions, database)}

        calls = {"client": compare.client_call(api_key, args.max_tokens),
                 "gateway": compare.http_call(gateway.url, args.max_tokens, api_key, "smollm2")}
        for call in calls.values():  # warm-up: every process's service built, connections open
            closed_loop(call, 4 * args.inflight, args.inflight, 300.0)
        settled(sessions)  # the warm-up's last settlements and deliveries
        info_bytes = info_cost(server, cpu, counts_dir)
        before = take(server, cpu, counts_dir)
        time.sleep(args.idle_s)  # the idle window itself: its length is what it measures
        idle = Phase.between("idle", 1, before, take(server, cpu, counts_dir), info_bytes)
        log(f"idle: {sum(idle.commands.values()) / idle.wall_s:.1f} commands/s")
        phases = []

        def phase(name: str, call: compare.Call) -> None:
            before = take(server, cpu, counts_dir)
            _, samples = closed_loop(call, args.requests, args.inflight, 300.0)
            # Settled before the requester had its answer; the delivery mark may still be on its way.
            settled(sessions)
            phases.append(Phase.between(name, args.requests, before, take(server, cpu, counts_dir), info_bytes))
            phases[-1].p50_ms = percentile([x.latency_s * 1000 for x in samples], 50)
            log(f"{name}: {args.requests} requests in {phases[-1].wall_s:.1f}s")

        for name, call in calls.items():
            phase(name, call)
        connected = int(server.r.info("clients")["connected_clients"]) - 1  # not this bench's own
        kinds = key_kinds(server.r)
        # Before the fillers: with them, the stack's own herd reads would weigh on the streams' figures.
        stream = token_stream(server, args.sequences, args.steps)
        herd = herd_read(server, args.keyspace)
        if args.keyspace and max(args.keyspace):
            # The gateway once more, with the herd read scanning the filler keys too.
            phase(f"gateway, {int(server.r.dbsize()):,} keys", calls["gateway"])
        return phases, idle, stream, Extra(connected, kinds, herd)
    finally:
        if gateway is not None:
            gateway.stop()
        if fleet is not None:
            fleet.stop()
        if sessions is not None:
            sessions.kw["bind"].dispose()
        drop_postgres_database(db_url)
        server.stop()


def report(args: argparse.Namespace, command: str, phases: list[Phase], idle: Phase,
           stream: dict[str, float], extra: Extra, started: float) -> str:
    per = [p.per_request(idle) for p in phases]
    names = [p.name for p in phases]
    version = subprocess.run(["redis-server", "--version"], capture_output=True, text=True).stdout.split()[2]
    commands = sorted({k for p in per for k, v in p.commands.items() if abs(v) >= 0.005},
                      key=lambda k: -max(p.commands.get(k, 0) for p in per))
    background = {k: v / idle.wall_s for k, v in idle.commands.items()}

    def cells(values: list[float], fmt: str = "{:.2f}") -> str:
        return " | ".join(fmt.format(v) for v in values)

    lines = [
        "# Redis commands, bytes and CPU per request; database round trips per request",
        "",
        f"`{command}` — {datetime.datetime.now():%Y-%m-%d %H:%M}, {os.cpu_count()} cores, redis-server "
        f"{version.removeprefix('v=')} of its own, PostgreSQL on loopback. One herder (`celery -A "
        f"tests.bench.sql_count worker -Q herder -c {HERDER_CONCURRENCY}`) with one `celery -A router beat`, one "
        f"stub worker (`-P threads -c {args.worker_threads}`), the gateway (`uvicorn tests.bench.sql_count:"
        f"gateway`). {args.requests} requests a phase, {args.inflight} in flight, `max_tokens` {args.max_tokens}, "
        "after a warm-up; the stub answers at once with a fixed text and writes no token stream.",
        "",
        f"Every figure is per request, net of the background measured over {idle.wall_s:.0f} s with no request "
        f"(scaled to the phase's length): {sum(background.values()):.1f} commands/s, "
        f"{idle.net_in / idle.wall_s:,.0f} B/s in and {idle.net_out / idle.wall_s:,.0f} B/s out. Commands are "
        "Redis's `INFO commandstats` calls (this bench's own INFO left out), bytes its `total_net_input_bytes` "
        "and `total_net_output_bytes`; CPU is each process group's user + system time from `/proc`.",
        *(["", f"The last column, *{phases[-1].name}*: the gateway's phase again after the herd read was timed "
           "(the last section), with that many filler keys in the database; net of the same background, "
           "measured before the fillers, so the tick's own herd reads over them count in it."]
          if len(phases) > 2 else []),
        "",
        "## Redis commands per request",
        "",
        "Calls per request, and the µs Redis spent executing them (`usec` of `INFO commandstats`: the command "
        "alone, not reading and writing its connection).",
        "",
        "| command | " + " | ".join(f"{n} calls" for n in names) + " | background calls per s | "
        + " | ".join(f"{n} µs" for n in names) + " |",
        "|---|" + "---:|" * (2 * len(names) + 1),
        *(f"| {k.upper()} | {cells([p.commands.get(k, 0.0) for p in per])} | {background.get(k, 0.0):.2f} | "
          f"{cells([p.usec.get(k, 0.0) for p in per], '{:.1f}')} |" for k in commands),
        f"| **total** | {cells([sum(p.commands.values()) for p in per], '**{:.1f}**')} | "
        f"{sum(background.values()):.1f} | {cells([sum(p.usec.values()) for p in per], '**{:.0f}**')} |",
        "",
        "| per request | " + " | ".join(names) + " | background per s |",
        "|---|" + "---:|" * (len(names) + 1),
        f"| bytes into Redis | {cells([p.net_in for p in per], '{:,.0f}')} | {idle.net_in / idle.wall_s:,.0f} |",
        f"| bytes out of Redis | {cells([p.net_out for p in per], '{:,.0f}')} | {idle.net_out / idle.wall_s:,.0f} |",
        f"| keys left in Redis (until they expire; not net of idle) | {cells([p.keys for p in per])} | |",
        f"| Redis memory left, bytes (`used_memory`; not net of idle) | {cells([p.memory for p in per], '{:,.0f}')} | |",
        "",
        f"Clients connected to Redis at the end, every process of the stack: {extra.connected}.",
        "",
        "Keys in Redis at the end of the run, by kind (ids cut off), with the longest time to live left of "
        f"each kind (every request of the run and its warm-up, {2 * args.requests + 8 * args.inflight} "
        "requests in all; -1: no expiry):",
        "",
        "| key | count | longest TTL left, s |",
        "|---|---:|---:|",
        *(f"| `{kind}` | {n} | {ttl:.0f} |" for kind, (n, ttl) in sorted(extra.kinds.items(), key=lambda x: -x[1][0])),
        "",
        "## CPU per request, ms",
        "",
        "| process | " + " | ".join(names) + " | background per s |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    for proc in ("redis", "herder", "gateway", "worker", "requester", "postgres"):
        label = {"herder": "herder (main, pool children, beat)", "worker": "stub worker",
                 "postgres": "PostgreSQL backends of the run's database"}.get(proc, proc)
        lines.append(f"| {label} | {cells([p.cpu.get(proc, 0.0) * 1000 for p in per], '{:.2f}')} | "
                     f"{idle.cpu.get(proc, 0.0) * 1000 / idle.wall_s:.2f} |")
    lines.append(f"| wall time per request at {args.inflight} in flight | "
                 f"{cells([p.wall_s * 1000 for p in per], '{:.1f}')} | |")
    lines.append(f"| requester's wait for its answer, p50 ms | {cells([p.p50_ms for p in per], '{:.1f}')} | |")
    lines += [
        "",
        "## Database round trips per request (herder and gateway, `tests.bench.sql_count`)",
        "",
        "| round trip | " + " | ".join(names) + " | background per s |",
        "|---|" + "---:|" * (len(names) + 1),
    ]
    labels = {"statement": "statements", "begin": "BEGIN", "commit": "COMMIT", "rollback": "ROLLBACK",
              "for_update": "of the statements: `FOR UPDATE`", "skip_locked": "of those: `SKIP LOCKED`",
              "advisory": "of the statements: advisory locks"}
    for kind in sql_count.KINDS:
        lines.append(f"| {labels[kind]} | {cells([p.sql.get(kind, 0.0) for p in per])} | "
                     f"{idle.sql.get(kind, 0) / idle.wall_s:.2f} |")
    trips = [sum(p.sql.get(k, 0.0) for k in ("statement", "begin", "commit", "rollback")) for p in per]
    lines += [
        f"| **round trips** (statements + BEGIN + COMMIT + ROLLBACK) | {cells(trips, '**{:.1f}**')} | "
        f"{sum(idle.sql.get(k, 0) for k in ('statement', 'begin', 'commit', 'rollback')) / idle.wall_s:.2f} |",
        "",
        "## The token stream (what a real worker adds per generated token)",
        "",
        f"{args.steps} steps of {args.sequences} sequences on the same Redis: each step one pipelined round trip "
        "of one `XADD` per sequence (`TokenPipe`), then every event read back one at a time with `XREAD` "
        "(a follower woken once per step).",
        "",
        "| per token event | written (XADD) | read (XREAD) |",
        "|---|---:|---:|",
        *(f"| {m} | {stream[f'write {m}']:.2f} | {stream[f'read {m}']:.2f} |"
          for m in ("commands", "CPU µs", "command µs", "bytes in", "bytes out")),
        "",
        "## The herd read against the keyspace",
        "",
        "`llama_tasks.heartbeat.read_herd` (each herder process and gateway, at most every 0.25 s: "
        "`router.herder.herd.MAX_AGE_S`) finds the heartbeats with `SCAN MATCH llamas:herd:* COUNT 500` over "
        "the whole database. Here with the database filled by `DEBUG POPULATE` (100-byte values), the best of "
        "3 reads:",
        "",
        "| keys in the database | SCAN calls a read | Redis CPU ms a read | wall ms a read |",
        "|---:|---:|---:|---:|",
        *(f"| {keys:,} | {scans} | {cpu:.1f} | {wall:.1f} |" for keys, scans, cpu, wall in extra.herd),
        "",
        f"Whole run: {time.time() - started:.0f}s.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.redis_ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=REQUESTS, help="requests of each phase")
    p.add_argument("--inflight", type=int, default=INFLIGHT, help="requests in flight (closed loop)")
    p.add_argument("--idle-s", type=float, default=IDLE_S, help="seconds of the background phase")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--worker-threads", type=int, default=WORKER_THREADS, help="the stub worker's task threads")
    p.add_argument("--sequences", type=int, default=SEQUENCES, help="token streams written at once")
    p.add_argument("--steps", type=int, default=STEPS, help="token events of each stream")
    p.add_argument("--keyspace", type=int, nargs="*", default=[0, 100_000, 400_000],
                   help="filler keys in the database before each timed herd read")
    p.add_argument("--postgres-url", default=os.environ.get("LLAMAS_TEST_POSTGRES_URL",
                                                            "postgresql://postgres@127.0.0.1:5432/test"))
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m tests.bench.redis_ops" + (" " + shlex.join(given) if given else "")
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="llamas-redis-ops-"))
    phases, idle, stream, extra = run(args, tmp)
    shutil.rmtree(tmp)  # kept, with every log, when the run fails
    text = report(args, command, phases, idle, stream, extra, started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
