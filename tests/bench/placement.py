"""Demand placement in simulation: a real herder moves stub workers between two models as a scripted
demand trace shifts, and the ledger is audited afterwards.

Run ``python -m tests.bench.placement`` (options: ``--help``). It starts, in
this one process:

- **a real herder**: ``HerderService`` with ``placement="demand"`` on a real
  SQL ledger (a fresh SQLite file, or a fresh PostgreSQL database with
  ``--postgres-url``) and real Redis, its
  tick run every ``tick_s`` (expiries, leases, placement, dispatch) and its
  results settled as they come. Work goes out in signed envelopes on a Redis
  list per model (the Celery queue's stand-in); the stub transport's
  forwarding records every delivery.
- **stub workers** (``SimWorker``), started with no model: each pops its
  control list, verifies every Init with ``llama_tasks.control.accept``,
  drains its running jobs, takes ``--load-s`` to "load", and publishes
  heartbeats in the workers' format (state, since, can_load, memory_mb, the
  latest Init's outcome). While serving it pops its model's list on
  ``--slots`` slots, and answers each envelope after ``--gen-s`` as the
  scripted worker of ``router.herder.stub`` does (it verifies the herder's
  signature, the model and the expiry, and signs its result as the house's
  worker).
- **a requester** submitting at a steady rate per phase: model A busy, then
  model B, then both (the bundled SmolLM2, registered a second time under
  another name with ``llama_tasks.registry.add_model``).

It reports per phase and model: the time from the phase's first request to a
worker serving that model (0 when one already did), how many workers served
it at the phase's end, queue wait p50/p95 (dispatch − admission, from the
ledger), Inits sent and workers moved back to a model they had left within
twice the dwell (flapping); then the audit of every job: none left open, none
charged twice, every hold settled, ``ledger.check`` clean, every response
delivered to its handle once. Writes ``tests/bench/results/placement.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.compare import SESSION_KEY, choose_redis, percentile
from tests.processes import ROOT

RESULTS = ROOT / "tests" / "bench" / "results" / "placement.md"
A, B = "smollm2", "smollm2-b"
PROMPT = "Grade the sentiment of this chat message from 1 to 5: what a lovely day"
#: ``JOBS_PREFIX + model`` → list of ``[task id, envelope]`` sent for that model (the Celery queue's stand-in).
JOBS_PREFIX = "llamas:bench:placement:jobs:"
#: List of results and failures the stub workers hand back, settled by the herder's side.
RESULTS_KEY = "llamas:bench:placement:results"
#: How long the run waits, after the trace, for every job to end.
DRAIN_TIMEOUT_S = 120.0
FUNDS = 10**15

log = logging.getLogger("bench.placement")


@dataclass(frozen=True)
class Phase:
    """A stretch of the trace: requests per second per model."""

    name: str
    seconds: float
    rates: dict[str, float]


def trace(seconds: float, rate: float, both: float) -> list[Phase]:
    return [Phase("A busy", seconds, {A: rate}), Phase("B busy", seconds, {B: rate}),
            Phase("both", seconds, {A: both, B: both})]


# --- the stub workers ------------------------------------------------------------------------


class SimWorker:
    """A worker with no model at start that changes models on signed Inits, as ``llama_tasks.switching`` does,
    with a simulated load and simulated generations."""

    def __init__(self, name: str, r: Any, public_key: Any, models: dict[str, Any], args: argparse.Namespace,
                 events: list[tuple[float, str, str, str | None]], model: str | None = None) -> None:
        from llama_tasks.control import IDLE, SERVING
        from router.herder import stub

        self.name, self.r, self.public_key, self.models = name, r, public_key, models
        self.slots, self.load_s, self.gen_s, self.grace_s = args.slots, args.load_s, args.gen_s, args.grace_s
        self.interval_s = args.heartbeat_s
        self.events = events
        self.state, self.model, self.since, self.busy = (SERVING if model else IDLE), model, time.time(), 0
        events.append((self.since, name, self.state, model))
        self.last: dict[str, Any] | None = None
        self.started_at = time.time()
        self.answer = stub.scripted_worker(public_key, models, worker=name)
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.wake = threading.Event()
        size_mb = -(-Path(next(iter(models.values())).path).stat().st_size // (1 << 20))
        self.can_load = [{"model": s.name, "model_id": s.model_id, "mb": size_mb} for s in models.values()]
        self.threads = [threading.Thread(target=self._beats, daemon=True),
                        threading.Thread(target=self._control, daemon=True),
                        *(threading.Thread(target=self._slot, daemon=True) for _ in range(self.slots))]

    def start(self) -> SimWorker:
        for t in self.threads:
            t.start()
        return self

    def close(self) -> None:
        from llama_tasks.constants import HERD_PREFIX

        self.stop.set()
        self.wake.set()
        for t in self.threads:
            t.join(timeout=2)
        self.r.delete(HERD_PREFIX + self.name)

    # --- what its heartbeat says ----------------------------------------------------------

    def describe(self) -> dict[str, Any]:
        from llama_tasks.control import SERVING

        with self.lock:
            spec = self.models.get(self.model) if self.model else None
            return {"worker": self.name, "model": self.model, "model_id": spec.model_id if spec else None,
                    "queue": f"llama.{self.model}" if spec and self.state == SERVING else None,
                    "state": self.state, "since": self.since, "slots": self.slots, "busy": self.busy,
                    "jobs": self.busy, "gpus": [], "n_ctx": 2048, "can_load": self.can_load, "memory_mb": None,
                    "init": self.last, "ts": time.time(), "pid": os.getpid(), "interval_s": self.interval_s}

    def _beats(self) -> None:
        from llama_tasks import heartbeat

        while not self.stop.is_set():
            heartbeat.beat(self.r, self.describe(), self.interval_s)
            self.wake.wait(self.interval_s)
            self.wake.clear()

    def _enter(self, state: str, model: str | None = None) -> None:
        with self.lock:
            self.state, self.since = state, time.time()
            if model is not None:
                self.model = model
            self.events.append((self.since, self.name, state, self.model))
        self.wake.set()

    def _report(self, nonce: str, model: str, outcome: str, reason: str = "") -> None:
        from llama_tasks import control

        with self.lock:
            self.last = control.outcome(nonce, model, outcome, reason, time.time())
        self.wake.set()

    # --- Inits -------------------------------------------------------------------------------

    def _control(self) -> None:
        from llama_tasks import control
        from llama_tasks.errors import Rejected

        while not self.stop.is_set():
            message = control.receive(self.r, self.name, 0.2)
            if message is None:
                continue
            try:
                init = control.accept(self.r, message, self.public_key, self.name, time.time(), self.started_at)
            except Rejected as exc:
                log.warning("%s refused a control message: %s", self.name, exc)
                continue
            self._apply(init)

    def _apply(self, init: Any) -> None:
        from llama_tasks.control import ACCEPTED, DRAINING, LOADED, LOADING, REFUSED, SERVING

        spec = self.models.get(init.model)
        if spec is None or spec.model_id != init.model_id:
            self._report(init.nonce, init.model, REFUSED, "not a model this worker has")
            return
        self._report(init.nonce, init.model, ACCEPTED)
        if self.model is not None:
            self._enter(DRAINING)
            deadline = time.monotonic() + min(init.grace_s, self.grace_s)
            while self.busy and time.monotonic() < deadline and not self.stop.is_set():
                time.sleep(0.02)
        self._enter(LOADING)
        self.stop.wait(self.load_s)
        self._enter(SERVING, init.model)
        self._report(init.nonce, init.model, LOADED)

    # --- jobs ---------------------------------------------------------------------------------

    def _slot(self) -> None:
        from llama_tasks.control import SERVING

        while not self.stop.is_set():
            with self.lock:
                model = self.model if self.state == SERVING else None
            if model is None:
                self.stop.wait(0.05)
                continue
            popped = self.r.blpop([JOBS_PREFIX + model], timeout=0.2)
            if popped is None:
                continue
            with self.lock:
                if self.state != SERVING or self.model != model:
                    # Taken as the worker stopped taking this model: back at the head, as a broker
                    # hands back a message its consumer let go of.
                    self.r.lpush(JOBS_PREFIX + model, popped[1])
                    continue
                self.busy += 1
            task_id, envelope = json.loads(popped[1])
            try:
                self.stop.wait(self.gen_s)
                out = {"task_id": task_id, "doc": self.answer(envelope, task_id)}
            except Exception as exc:  # the attempt's outcome, settled as a failure
                out = {"task_id": task_id, "error": f"{type(exc).__name__}: {exc}"}
            finally:
                with self.lock:
                    self.busy -= 1
            self.r.rpush(RESULTS_KEY, json.dumps(out))


# --- the herder's side -------------------------------------------------------------------------


def transport_class() -> Any:
    from router.herder import stub

    class ListTransport(stub.StubTransport):
        """The stub transport's forwarding, with each envelope sent to its model's Redis list."""

        def __init__(self, r: Any) -> None:
            super().__init__()
            self.r = r

        def send(self, row: Any, envelope: dict[str, Any]) -> None:
            self.r.rpush(JOBS_PREFIX + row.model, json.dumps([row.task_id, envelope]))

    return ListTransport


def settle_loop(svc: Any, r: Any, stop: threading.Event) -> None:
    """Settle what the workers hand back, in batches, as the herder's result reader does."""
    while not stop.is_set():
        popped = r.blpop([RESULTS_KEY], timeout=0.2)
        if popped is None:
            continue
        raw = [popped[1], *(r.lpop(RESULTS_KEY, 63) or [])]
        items = [json.loads(x) for x in raw]
        done = [(i["task_id"], i["doc"]) for i in items if "doc" in i]
        if done:
            svc.on_results(done)
        for item in items:
            if "error" in item:
                svc.on_failure(item["task_id"], RuntimeError(item["error"]))


def tick_loop(svc: Any, stop: threading.Event, every_s: float) -> None:
    while not stop.wait(every_s):
        try:
            svc.tick()
        except Exception:  # the next tick tries again, as beat's next tick would
            log.exception("tick failed")


@dataclass
class Requests:
    """What the requester sent: (phase, model, job id, submitted at); and how many went in while no
    worker served their model."""

    sent: list[tuple[str, str, str, float]] = field(default_factory=list)
    unserved: int = 0


def submit(svc: Any, api_key: str, model: str, requests: Requests) -> str:
    """Submit through the herder, as every requester does; one for a model nobody serves yet is
    admitted to wait for placement (counted in ``requests.unserved``)."""
    from router.core import dispatch
    from router.core.request import Submission

    if not dispatch.capacity(svc.herd()).get(model, 0):
        requests.unserved += 1
    return str(svc.submit(api_key, Submission(prompt=PROMPT, max_tokens=8, model=model))["job_id"])


def run_trace(svc: Any, api_key: str, phases: list[Phase]) -> tuple[Requests, list[tuple[str, float, float]]]:
    """Send the trace's requests at their times; returns them and each phase's (name, start, end)."""
    requests = Requests()
    windows = []
    for phase in phases:
        start = time.time()
        arrivals = sorted((start + (k + 0.5) / rate, model) for model, rate in phase.rates.items()
                          for k in range(int(phase.seconds * rate)))
        for at, model in arrivals:
            pause = at - time.time()
            if pause > 0:
                time.sleep(pause)
            requests.sent.append((phase.name, model, submit(svc, api_key, model, requests), time.time()))
        end = max(time.time(), start + phase.seconds)
        time.sleep(max(0.0, end - time.time()))
        windows.append((phase.name, start, end))
        log.info("phase %s done: %d requests", phase.name, sum(1 for p, *_ in requests.sent if p == phase.name))
    return requests, windows


# --- what happened --------------------------------------------------------------------------------


def serving_at(events: list[tuple[float, str, str, str | None]], model: str, t: float) -> int:
    """Workers serving ``model`` at time ``t``, replaying their state changes."""
    from llama_tasks.control import SERVING

    now: dict[str, bool] = {}
    for at, worker, state, current in sorted(events):
        if at > t:
            break
        now[worker] = state == SERVING and current == model
    return sum(now.values())


def first_serving(events: list[tuple[float, str, str, str | None]], model: str, t: float) -> float | None:
    """Seconds from ``t`` until a worker served ``model`` (0 if one already did); None if none ever did."""
    from llama_tasks.control import SERVING

    if serving_at(events, model, t):
        return 0.0
    later = [at for at, _, state, current in events if at >= t and state == SERVING and current == model]
    return min(later) - t if later else None


def moves_back(decisions: list[dict[str, Any]], within_s: float) -> int:
    """Workers sent back to the model they had left less than ``within_s`` before."""
    back = 0
    by_worker: dict[str, list[dict[str, Any]]] = {}
    for d in sorted(decisions, key=lambda d: d["at"]):
        by_worker.setdefault(d["worker"], []).append(d)
    for moves in by_worker.values():
        for earlier, later in zip(moves, moves[1:], strict=False):
            if earlier["from"] is not None and later["to"] == earlier["from"] and later["at"] - earlier["at"] < within_s:
                back += 1
    return back


def audit(svc: Any, transport: Any) -> dict[str, Any]:
    """Every job ended once, nothing charged twice, every hold settled, the books balanced."""
    from sqlalchemy import select

    from router.core import ledger, settlement
    from router.core.models import OPEN_STATES, JobRow, Transfer

    with svc.sessions() as session:
        jobs = list(session.scalars(select(JobRow)))
        kinds: Counter[tuple[str, str]] = Counter()
        net: Counter[str] = Counter()
        for job_id, kind, amount in session.execute(
                select(Transfer.job_id, Transfer.kind, Transfer.amount).where(Transfer.job_id.is_not(None))):
            kinds[str(job_id), kind] += 1
            net[str(job_id)] += amount if kind == "hold" else -amount
        problems = [f"ledger.check: {p}" for p in ledger.check(session)]
    states = Counter(j.state for j in jobs)
    lost = [j.id for j in jobs if j.state in OPEN_STATES]
    twice = [j.id for j in jobs if kinds[j.id, "capture"] > 1 or kinds[j.id, "release"] > 1]
    unbalanced = [j.id for j in jobs if j.state not in OPEN_STATES and (
        net[j.id] != 0 or j.charged is None or j.refunded is None or j.charged + j.refunded != j.offered
        or (not settlement.chargeable(j) and j.charged))]
    delivered_twice = [job for job, n in transport.handle_deliveries.items() if n > 1]
    undelivered = [j.id for j in jobs if j.state not in OPEN_STATES and j.id not in transport.handle_deliveries]
    attempts = Counter(j.attempt for j in jobs)
    return {"jobs": len(jobs), "states": dict(states), "lost": len(lost), "charged_twice": len(twice),
            "unbalanced": len(unbalanced), "delivered_twice": len(delivered_twice),
            "undelivered": len(undelivered), "problems": problems, "attempts": dict(attempts),
            "balanced": not problems}


def phase_rows(svc: Any, requests: Requests, windows: list[tuple[str, float, float]], phases: list[Phase],
               events: list[tuple[float, str, str, str | None]], decisions: list[dict[str, Any]],
               dwell_s: float) -> list[list[str]]:
    from sqlalchemy import select

    from router.core.models import JobRow

    with svc.sessions() as session:
        rows = {r.id: r for r in session.scalars(select(JobRow))}
    table = []
    for index, ((name, start, end), phase) in enumerate(zip(windows, phases, strict=True)):
        # The last phase's decisions include those made while the queue drained after it.
        until = float("inf") if index == len(windows) - 1 else end
        inits = [d for d in decisions if start <= d["at"] < until]
        back = moves_back([d for d in decisions if d["at"] < until], 2 * dwell_s) - moves_back(
            [d for d in decisions if d["at"] < start], 2 * dwell_s)
        for model in (A, B):
            sent = [(job, at) for p, m, job, at in requests.sent if p == name and m == model]
            waits = [rows[job].dispatched_at - rows[job].created_at for job, _ in sent
                     if rows[job].dispatched_at is not None]
            if sent:
                first = first_serving(events, model, sent[0][1])
                to_serving = "never" if first is None else f"{first:.1f}"
            else:
                to_serving = "—"
            table.append([
                name, model, f"{phase.rates.get(model, 0):g}", str(len(sent)), to_serving,
                str(serving_at(events, model, end)),
                f"{percentile(waits, 50):.2f}" if waits else "—",
                f"{percentile(waits, 95):.2f}" if waits else "—",
                str(sum(1 for d in inits if d["to"] == model)),
                str(back) if model == A else "",
            ])
    return table


HEADER = ["phase", "model", "req/s", "requests", "demand → serving, s", "workers serving at end",
          "queue wait p50, s", "queue wait p95, s", "Inits sent to it", "moves back (phase)"]


@dataclass
class Outcome:
    """One configuration's run: its table, its audit and placement's decisions."""

    label: str
    table: list[list[str]]
    checked: dict[str, Any]
    requests: Requests
    decisions: list[dict[str, Any]]
    t0: float
    wall_s: float

    def lines(self) -> list[str]:
        checked = self.checked
        states = ", ".join(f"{n} {s}" for s, n in sorted(checked["states"].items()))
        lines = [
            f"### {self.label}",
            "",
            "| " + " | ".join(HEADER) + " |",
            "|---|---|" + "---:|" * (len(HEADER) - 2),
            *("| " + " | ".join(row) + " |" for row in self.table),
            "",
            f"**Audit** of all {checked['jobs']} jobs after draining ({self.wall_s:.0f} s in all): {states}; "
            f"lost (still open) {checked['lost']}, charged or refunded twice {checked['charged_twice']}, holds not "
            f"settled exactly {checked['unbalanced']}, responses delivered twice {checked['delivered_twice']}, "
            f"never delivered {checked['undelivered']}; `ledger.check`: "
            + ("the books balance." if checked["balanced"] else "; ".join(checked["problems"])),
            f"Attempts per job: {', '.join(f'{n} job(s) {a}' for a, n in sorted(checked['attempts'].items()))}. "
            f"Requests admitted while no worker served their model: {self.requests.unserved}.",
            "",
        ]
        if self.decisions:
            lines += [f"Placement's decisions ({len(self.decisions)}), seconds from the start:", "",
                      *(f"- {d['at'] - self.t0:6.1f} s: {d['worker']} {d['from'] or 'no model'} → {d['to']}: "
                        f"{d['reason']}" for d in sorted(self.decisions, key=lambda d: d["at"])), ""]
        return lines


def report(args: argparse.Namespace, command: str, outcomes: list[Outcome]) -> str:
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    lines = [
        "# Demand placement, simulated: model A busy, then B, then both",
        "",
        f"`{command}` — {when}, {os.cpu_count()} cores ({platform.machine()}), Python "
        f"{platform.python_version()}, {args.ledger} ledger, Redis on loopback.",
        "",
        f"- **herd**: {args.workers} stub workers, {args.slots} slots each; an Init costs the drain of running "
        f"jobs plus {args.load_s:g} s of loading; a job takes {args.gen_s:g} s (so "
        f"{args.slots / args.gen_s:g} jobs/s per worker).",
        f"- **herder**: a real `HerderService`, tick {args.tick_s:g} s; *demand*: `placement=demand`, dwell "
        f"{args.dwell_s:g} s, wait {args.wait_s:g} s, every worker started with no model; *static*: "
        "`placement=off`, half the workers started on A and half on B. One requester, one account (no "
        "fair-share limits).",
        f"- **trace**: {args.phase_s:g} s per phase; A at {args.rate:g} req/s, then B at {args.rate:g} req/s, "
        f"then both at {args.both:g} req/s each.",
        "- *demand → serving*: from the phase's first request for the model to a worker serving it "
        "(0: one already did). *queue wait*: dispatch − admission of the phase's jobs of that model, from the "
        "ledger. *Inits sent to it* and *moves back* (workers sent back to the model they had left less than "
        "twice the dwell before: flapping, over the whole herd) count the last phase's drain too.",
        "",
    ]
    for outcome in outcomes:
        lines += outcome.lines()
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.bench.placement", description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--gen-s", type=float, default=0.5, help="simulated time of one job")
    p.add_argument("--load-s", type=float, default=2.0, help="simulated time of one model load")
    p.add_argument("--grace-s", type=float, default=30.0, help="longest a draining worker waits for its jobs")
    p.add_argument("--heartbeat-s", type=float, default=0.5)
    p.add_argument("--phase-s", type=float, default=30.0)
    p.add_argument("--rate", type=float, default=10.0, help="req/s of the one busy model in phases A and B")
    p.add_argument("--both", type=float, default=5.0, help="req/s of each model in the last phase")
    p.add_argument("--dwell-s", type=float, default=10.0)
    p.add_argument("--wait-s", type=float, default=2.0)
    p.add_argument("--tick-s", type=float, default=1.0)
    p.add_argument("--no-static", action="store_true", help="skip the run with placement off (half on each model)")
    p.add_argument("--postgres-url", default="",
                   help="keep each run's ledger in a fresh database of this PostgreSQL server (e.g. "
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test), dropped afterwards; default: SQLite files")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.ledger = "PostgreSQL" if args.postgres_url else "SQLite"
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    given = sys.argv[1:] if argv is None else argv
    command = "python -m tests.bench.placement" + (" " + shlex.join(given) if given else "")
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    for name in (log.name, "router.core.service"):  # progress and placement's decisions, not migrations
        logging.getLogger(name).setLevel(logging.INFO)
    chosen = choose_redis()
    tmp = Path(tempfile.mkdtemp(prefix="llamas-placement-"))
    os.environ.update(LLAMAS_HOME=str(tmp / "home"), LLAMAS_REDIS_URL=chosen.url)
    outcomes = []
    try:
        if not args.no_static:
            outcomes.append(run(args, "static", tmp / "static", chosen.url))
        outcomes.append(run(args, "demand", tmp / "demand", chosen.url))
    finally:
        chosen.release()
    text = report(args, command, outcomes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


def run(args: argparse.Namespace, mode: str, home: Path, redis_url: str) -> Outcome:
    """One configuration on a fresh ledger and a flushed Redis database: ``demand`` or ``static``."""
    import redis

    from tests.bench.scale import fresh_database
    from tests.stack import drop_postgres_database

    r = redis.Redis.from_url(redis_url)
    r.flushdb()
    r.set(SESSION_KEY, os.getpid(), ex=3600)  # a test session reads a live pid here and leaves the database alone
    database_url = fresh_database(args.postgres_url) if args.postgres_url else ""
    try:
        return _run(args, mode, home, redis_url, r, database_url)
    finally:
        if database_url:
            drop_postgres_database(database_url)


def _run(args: argparse.Namespace, mode: str, home: Path, redis_url: str, r: Any, database_url: str) -> Outcome:
    from llama_tasks import registry
    from llama_tasks.scripted import SCRIPTED_TEXT
    from router.core import ledger, placement_store
    from router.core.models import OPEN_STATES, JobRow
    from router.core.request import Submission
    from router.core.settings import HerderSettings
    from router.herder import stub
    from router.herder.herd import HerdReader
    from tests.processes import poll

    settings = HerderSettings(
        home=home, redis_url=redis_url, database_url=database_url,
        placement="demand" if mode == "demand" else "off",
        placement_dwell_s=args.dwell_s, placement_wait_s=args.wait_s, tick_s=args.tick_s,
        soft_time_limit_s=25, time_limit_s=30, lease_grace_s=5.0,
        account_max_in_flight=10**6, account_max_queued=10**6, account_requests_per_minute=0,
        account_tokens_per_minute=0, max_queue=10**6)
    home.mkdir(parents=True, exist_ok=True)
    bundled = registry.builtin_models()[A]
    registry.add_model(settings.models_file, B, Path(bundled.path))
    transport = transport_class()(r)
    herd = HerdReader(r)
    svc = stub.build(settings, transport=transport, herd=herd)
    with svc.sessions.begin() as session:
        _, api_key = ledger.create_account(session, "bench", FUNDS)
    models = {name: spec for name, spec in svc.counter.models().items() if name in (A, B)}
    # Each tokenizer's first load silences this process's stdout and stderr for a moment (llama.cpp's loader);
    # two at once on two threads can leave them silenced for good. Loaded here, one at a time, before any thread.
    for name, spec in models.items():
        svc.quote(Submission(prompt=PROMPT, max_tokens=8, model=name))
        stub.generated_tokens(spec, SCRIPTED_TEXT)
    events: list[tuple[float, str, str, str | None]] = []
    workers = [SimWorker(f"sim{i}@bench", r, svc.public_key, models, args, events,
                         None if mode == "demand" else (A, B)[i % 2]).start()
               for i in range(args.workers)]
    stop = threading.Event()
    background = [threading.Thread(target=settle_loop, args=(svc, r, stop), daemon=True),
                  threading.Thread(target=tick_loop, args=(svc, stop, args.tick_s), daemon=True)]
    for t in background:
        t.start()
    phases = trace(args.phase_s, args.rate, args.both)
    t0 = time.time()
    try:
        poll(lambda: len(herd(fresh=True)) == args.workers, 10.0, every_s=0.1)
        requests, windows = run_trace(svc, api_key, phases)

        def drained() -> bool:
            from sqlalchemy import func, select

            with svc.sessions() as session:
                return not session.scalar(select(func.count()).select_from(JobRow)
                                          .where(JobRow.state.in_(OPEN_STATES)))

        if not poll(drained, DRAIN_TIMEOUT_S, every_s=0.5):  # the audit counts them as lost
            log.warning("jobs still open %.0f s after the trace", DRAIN_TIMEOUT_S)
        wall_s = time.time() - t0
    finally:
        stop.set()
        for t in background:
            t.join(timeout=5)
        for w in workers:
            w.close()
    decisions = placement_store.decisions(r)
    checked = audit(svc, transport)
    table = phase_rows(svc, requests, windows, phases, events, decisions, args.dwell_s)
    svc.sessions.kw["bind"].dispose()
    label = ("demand: `placement=demand`, every worker started with no model" if mode == "demand" else
             "static: `placement=off`, half the workers on each model")
    return Outcome(label, table, checked, requests, decisions, t0, wall_s)


if __name__ == "__main__":
    main()
