"""Demand placement: which worker the herder tells to serve which model, and why.

Each tick (with ``LLAMAS_PLACEMENT=demand``) the herder reads what waits in the
ledger per model (``demand``) and the herd's heartbeats, and ``plan`` says
which workers to re-initialise towards which model (``decide``: just the
moves). It is a pure function of the herd, the demand, the time and the
settings, so scripted herds test it without processes;
``HerderService.place`` sends what it decides.

The rules, in the order they are applied:

- **Who needs a worker.** A model with queued jobs whose queue is not already
  covered by workers on their way to it (loading, draining towards it, or sent
  an Init their heartbeat does not show yet): their slots are its coming
  supply, so one backlog never moves two workers where one does. Models are
  served by urgency: one nobody serves or is coming to first, then by backlog
  per slot (queued sequences over the slots serving it or on their way) times
  the best queued bid, then by the oldest wait.
- **Who may move.** A worker on its way somewhere is never moved again. An
  idle worker (no model) moves at once. A worker serving a model moves only
  after ``placement_dwell_s`` in that state, and only to a model whose oldest
  queued job has waited ``placement_wait_s`` (a model nobody serves, nor is
  coming to, does not wait). It leaves a model with nothing queued only if the
  slots that stay hold every sequence of that model running now (so its last
  worker leaves only when nothing of its model runs: no job is left in flight
  with no one to run it) and, unless it goes to a model nobody serves, the
  model's load averaged over ``LOAD_WINDOW_S`` (a gap between bursts of
  requests does not make a model in steady use look idle). It leaves a model
  with queued work only if another worker still serves it, and only when the other model's
  backlog per slot is ``HYSTERESIS`` times what its own will be once it has
  gone, so two busy models never trade a worker back and forth.
- **Where it may go.** Only to a model its heartbeat says it can load
  (``can_load``) with the id this herder's registry gives that name, whose
  size fits the memory it declares, and which it has not refused in the last
  ``REFUSED_BACKOFF_S``.

Among the workers that may move to a model, idle ones go first, then those of
a model with nothing queued, then the least busy, then the longest in their
state. Every move carries a reason a person can read, and so does every model
left waiting with no worker moving to it (``plan``'s ``waiting``: each other
worker's reason); none carries text of a job.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import and_, func, or_, select
from sqlalchemy.orm import Session

from llama_tasks.control import ACCEPTED, DRAINING, IDLE, INIT_TTL_S, LOADING, REFUSED, SERVING
from router.core import fees
from router.core.models import QUEUED, RUNNING, JobRow
from router.core.settings import HerderSettings

#: A model's backlog per slot must be this many times the donor model's (after the move)
#: before a worker leaves a model that still has queued work.
HYSTERESIS = 2.0
#: A worker that refused an Init for a model is not sent that model again for this long.
REFUSED_BACKOFF_S = 60.0
#: An Init sent whose outcome no heartbeat has shown after this long is forgotten (it expired unread).
PENDING_TTL_S = INIT_TTL_S
#: The window over which a model's load (the slots its jobs kept busy) is averaged.
LOAD_WINDOW_S = 10.0


@dataclass(frozen=True)
class Demand:
    """What waits for one model in the ledger."""

    model: str
    #: Jobs queued.
    queued: int = 0
    #: Slots those jobs need (a job of ``n`` choices needs ``n``).
    sequences: int = 0
    #: ``created_at`` of the oldest queued job (Unix s); None when nothing is queued.
    oldest_at: float | None = None
    #: Best bid among the queued jobs, in millionths of the quote.
    best_bid_ppm: int = 0
    #: Sequences of this model running now (dispatched and not ended).
    running: int = 0
    #: Sequences of this model that ran on average over the last ``LOAD_WINDOW_S`` (slot-seconds / window).
    load: float = 0.0

    def wait_s(self, now: float) -> float:
        """How long the oldest queued job has waited."""
        return 0.0 if self.oldest_at is None else max(0.0, now - self.oldest_at)


def demand(session: Session, now: float) -> dict[str, Demand]:
    """Every model with jobs queued, running or run over the last ``LOAD_WINDOW_S``, and what waits for it."""
    found: dict[str, Demand] = {}
    for model, queued, sequences, oldest, best in session.execute(
        select(JobRow.model, func.count(), func.sum(JobRow.n), func.min(JobRow.created_at), func.max(JobRow.bid_ppm))
        .where(JobRow.state == QUEUED).group_by(JobRow.model)
    ):
        found[model] = Demand(model, int(queued), int(sequences or 0), float(oldest), int(best or 0))
    for model, running in session.execute(
        select(JobRow.model, func.sum(JobRow.n)).where(JobRow.state == RUNNING).group_by(JobRow.model)
    ):
        found[model] = replace(found.get(model) or Demand(model), running=int(running or 0))
    since = now - LOAD_WINDOW_S
    busy: dict[str, float] = defaultdict(float)
    # What runs, and what ended in the window. A job's text is kept past the longest webhook delivery
    # (``text_kept_s``, far longer than the window): ``text_erased_at IS NULL`` lets the index on
    # (text_erased_at, finished_at) find the ended ones.
    for model, n, dispatched, finished in session.execute(
        select(JobRow.model, JobRow.n, JobRow.dispatched_at, JobRow.finished_at)
        .where(JobRow.dispatched_at.is_not(None),
               or_(JobRow.state == RUNNING, and_(JobRow.text_erased_at.is_(None), JobRow.finished_at >= since)))
    ):
        if dispatched is None:
            continue
        end = min(now, finished if finished is not None else now)
        busy[model] += max(0.0, end - max(float(dispatched), since)) * int(n or 1)
    for model, slot_s in busy.items():
        found[model] = replace(found.get(model) or Demand(model), load=slot_s / LOAD_WINDOW_S)
    return found


@dataclass(frozen=True)
class Pending:
    """An Init this herder sent that the worker's heartbeat does not show yet."""

    worker: str
    model: str
    nonce: str
    at: float

    def settled(self, herd: Iterable[dict[str, Any]], now: float) -> bool:
        """Whether the heartbeat now speaks for it (it shows the nonce), its worker is gone, or it expired."""
        if now - self.at > PENDING_TTL_S:
            return True
        for doc in herd:
            if doc.get("worker") == self.worker:
                return (doc.get("init") or {}).get("nonce") == self.nonce
        return True


@dataclass(frozen=True)
class Move:
    """One decision: tell ``worker`` (serving ``from_model``, or nothing) to serve ``to_model``."""

    worker: str
    from_model: str | None
    to_model: str
    reason: str

    def to_doc(self, at: float) -> dict[str, Any]:
        return {"at": at, "worker": self.worker, "from": self.from_model, "to": self.to_model,
                "reason": self.reason}


@dataclass
class _Worker:
    """One heartbeat as placement reads it."""

    name: str
    model: str | None
    state: str
    since: float
    slots: int
    busy: int
    #: The model an Init in flight moves it to (sent, accepted, draining or loading), else None.
    target: str | None
    #: Name → (model id, MB) of what it can load.
    can_load: dict[str, tuple[str, int]]
    memory_mb: int | None
    #: The model and time of its latest Init, when that Init was refused.
    refused: tuple[str, float] | None

    @classmethod
    def of(cls, doc: dict[str, Any], pending: Pending | None, now: float) -> _Worker:
        state = str(doc.get("state") or (SERVING if doc.get("model") else IDLE))
        init = doc.get("init") or {}
        target = None
        if pending is not None:
            target = pending.model
        elif init.get("outcome") == ACCEPTED and state in (DRAINING, LOADING):
            target = init.get("model")
        can_load: dict[str, tuple[str, int]] = {}
        for item in doc.get("can_load") or []:
            try:
                can_load[str(item["model"])] = (str(item["model_id"]), int(item["mb"]))
            except (KeyError, TypeError, ValueError):
                continue  # an entry we cannot read is a model we do not send
        refused = None
        if init.get("outcome") == REFUSED and init.get("model"):
            refused = (str(init["model"]), float(init.get("at") or 0.0))
        memory = doc.get("memory_mb")
        return cls(name=str(doc["worker"]), model=doc.get("model"), state=state,
                   since=float(doc.get("since") or now), slots=int(doc.get("slots") or 0),
                   busy=int(doc.get("busy") or 0), target=target, can_load=can_load,
                   memory_mb=None if memory is None else int(memory), refused=refused)

    @property
    def serves(self) -> str | None:
        """The model it takes work for now and stays on (not idle, not moving)."""
        return self.model if self.state == SERVING and self.model and self.target is None else None

    def may_load(self, model: str, model_id: str, now: float) -> bool:
        entry = self.can_load.get(model)
        if entry is None or entry[0] != model_id:
            return False
        if self.memory_mb is not None and entry[1] > self.memory_mb:
            return False
        return not (self.refused and self.refused[0] == model and now - self.refused[1] < REFUSED_BACKOFF_S)


def could_serve(herd: Iterable[dict[str, Any]], model: str, model_id: str, now: float) -> bool:
    """Whether some live worker could be placed on ``model`` (its file, with this id, fits its memory).

    What admission asks under demand placement before it queues a request
    for a model nobody serves: such a request waits for placement; one for a
    model no worker could load is refused at once.
    """
    return any(_Worker.of(doc, None, now).may_load(model, model_id, now) for doc in herd if doc.get("worker"))


class _Plan:
    """The herd as the moves decided so far leave it."""

    def __init__(self, workers: list[_Worker], wanted: Mapping[str, Demand]) -> None:
        self.workers = workers
        self.wanted = wanted
        self.serving: dict[str, int] = defaultdict(int)
        self.coming: dict[str, int] = defaultdict(int)
        for w in workers:
            if w.serves:
                self.serving[w.serves] += w.slots
            if w.target:
                self.coming[w.target] += w.slots

    def supply(self, model: str) -> int:
        return self.serving[model] + self.coming[model]

    def urgency(self, model: str, supply: int | None = None) -> float:
        """Queued sequences per slot (serving or coming), times the best queued bid."""
        d = self.wanted.get(model) or Demand(model)
        slots = self.supply(model) if supply is None else supply
        return d.sequences / max(slots, 1) * d.best_bid_ppm / fees.PPM

    def move(self, w: _Worker, model: str) -> None:
        if w.serves:
            self.serving[w.serves] -= w.slots
        w.target = model
        self.coming[model] += w.slots


def _needy(plan: _Plan, models: Mapping[str, str], now: float) -> list[Demand]:
    """Models whose queue is not covered by the workers on their way to them, most urgent first."""
    needy = [d for d in plan.wanted.values()
             if d.model in models and d.queued > 0 and d.sequences > plan.coming[d.model]]
    return sorted(needy, key=lambda d: (plan.supply(d.model) == 0, plan.urgency(d.model), d.wait_s(now), d.model),
                  reverse=True)


def _why_needed(plan: _Plan, d: Demand, now: float) -> str:
    supply = plan.supply(d.model)
    return (f"{d.model} has {d.queued} job(s) queued ({d.sequences} slot(s)), the oldest for {d.wait_s(now):.1f}s, "
            f"best bid {d.best_bid_ppm / fees.PPM:.2f}x, "
            + (f"with {supply} slot(s) serving it or on their way" if supply else "and no worker serving it "
               "or on its way"))


def _donor(plan: _Plan, d: Demand, models: Mapping[str, str], now: float,
           settings: HerderSettings) -> tuple[tuple[_Worker, str] | None, list[str]]:
    """The worker to move to ``d.model`` and why it may go (or None), and why each other worker may not."""
    unserved = plan.supply(d.model) == 0
    waited = unserved or d.wait_s(now) >= settings.placement_wait_s
    options: list[tuple[tuple[Any, ...], _Worker, str]] = []
    skipped: list[str] = []
    for w in plan.workers:
        if w.model == d.model and w.target is None:
            continue  # serves it already (or is on its way to it)
        if w.target is not None:
            skipped.append(f"{w.name} is on its way to {w.target}")
            continue
        if not w.may_load(d.model, models[d.model], now):
            skipped.append(f"{w.name} cannot load it (no such file, another id, too big, or refused lately)")
            continue
        if w.state == IDLE:
            options.append(((0, w.busy, w.since, w.name), w, f"{w.name} is idle"))
            continue
        old = w.serves
        if old is None:
            skipped.append(f"{w.name} is {w.state}")
            continue
        if not waited:
            skipped.append(f"{w.name} serves {old}, and {d.model}'s queue has waited {d.wait_s(now):.1f}s, "
                           f"less than {settings.placement_wait_s:g}s")
            continue
        served_s = now - w.since
        if served_s < settings.placement_dwell_s:
            skipped.append(f"{w.name} has served {old} for {served_s:.0f}s of its {settings.placement_dwell_s:g}s")
            continue
        there = plan.wanted.get(old) or Demand(old)
        left = plan.serving[old] - w.slots
        dwell = f"{w.name} has served {old} for {served_s:.0f}s (at least {settings.placement_dwell_s:.0f}s)"
        if there.queued == 0:
            # The slots that stay must hold what runs now and, unless the other model has no worker at all,
            # the load of the last moments too: a gap between bursts does not make a model idle.
            keep = there.running if unserved else max(there.running, math.ceil(there.load))
            if keep > left:
                skipped.append(f"{w.name}: {old} still needs {keep} slot(s) and would keep {left}")
                continue
            options.append(((1, w.busy, w.since, w.name), w,
                            f"{dwell} and nothing of {old} is queued ({there.running} running, "
                            f"{there.load:.1f} on average over {LOAD_WINDOW_S:g}s; {left} slot(s) stay)"))
            continue
        if left <= 0:
            skipped.append(f"{w.name} is the last worker of {old}, which has queued work")
            continue
        after = plan.urgency(old, supply=plan.supply(old) - w.slots)
        if not unserved and plan.urgency(d.model) < HYSTERESIS * after:
            skipped.append(f"{w.name}: {d.model}'s backlog per slot is not {HYSTERESIS:g}x what {old}'s would be")
            continue
        options.append(((2, w.busy, w.since, w.name), w,
                        f"{dwell}; {old} keeps {left} slot(s) for its {there.queued} queued job(s), and "
                        + (f"{d.model} has none" if unserved else
                           f"{d.model}'s backlog per slot is at least {HYSTERESIS:g}x what {old}'s will be")))
    if not options:
        return None, skipped
    _, worker, why = min(options, key=lambda option: option[0])
    return (worker, why), skipped


@dataclass(frozen=True)
class Decisions:
    """One placement step: the moves, and why each model still short of workers gets none."""

    moves: list[Move]
    #: Model → why no worker moves to it although its queue is not covered.
    waiting: dict[str, str]


def plan(herd: list[dict[str, Any]], wanted: Mapping[str, Demand], now: float, settings: HerderSettings,
         models: Mapping[str, str], pending: Mapping[str, Pending] | None = None) -> Decisions:
    """The workers to re-initialise now and the model each should serve, with the reason.

    ``herd`` is the heartbeats, ``wanted`` the ledger's ``demand``, ``models``
    this herder's registry (name → model id: only those are placed),
    ``pending`` the Inits sent that heartbeats do not show yet, by worker.
    """
    pending = pending or {}
    state = _Plan([_Worker.of(doc, pending.get(str(doc["worker"])), now) for doc in herd if doc.get("worker")],
                  wanted)
    moves: list[Move] = []
    while True:
        waiting: dict[str, str] = {}
        for d in _needy(state, models, now):
            found, skipped = _donor(state, d, models, now, settings)
            if found is None:
                waiting[d.model] = (f"{_why_needed(state, d, now)}; no worker moves to it: "
                                    + ("; ".join(skipped) if skipped else "there is no other worker"))
                continue
            worker, why = found
            moves.append(Move(worker.name, worker.model, d.model, f"{why}; {_why_needed(state, d, now)}"))
            state.move(worker, d.model)
            break  # the herd has changed: rank the models again
        else:
            return Decisions(moves, waiting)


def decide(herd: list[dict[str, Any]], wanted: Mapping[str, Demand], now: float, settings: HerderSettings,
           models: Mapping[str, str], pending: Mapping[str, Pending] | None = None) -> list[Move]:
    """``plan``'s moves."""
    return plan(herd, wanted, now, settings, models, pending).moves
