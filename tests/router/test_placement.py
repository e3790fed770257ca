"""Demand placement: the decision function on scripted herds and demand, the demand query on a real
ledger, and the herder's placement step sending signed Inits through real Redis."""

from __future__ import annotations

import json
from collections import Counter, deque
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from llama_tasks import control
from llama_tasks.control import ACCEPTED, DRAINING, IDLE, LOADED, LOADING, REFUSED, SERVING
from router.core import broker_access, ledger, placement, placement_store
from router.core.errors import NoWorkers
from router.core.keys import PLACEMENT_DECISIONS, PLACEMENT_LOCK, PLACEMENT_PENDING, PLACEMENT_WAITING
from router.core.placement import Demand, Pending, decide
from router.core.request import Submission
from router.core.settings import HerderSettings
from router.herder import stub
from router.herder.tokens import TokenCounter
from tests.router.conftest import T0, TWIN_MODEL, Herder

A, B = "smollm2", TWIN_MODEL
IDS = {A: "a" * 64, B: "b" * 64}
NOW = T0
DWELL_S, WAIT_S = 30.0, 2.0


@pytest.fixture
def settings(tmp_path: Path) -> HerderSettings:
    return HerderSettings(home=tmp_path, placement="demand", placement_dwell_s=DWELL_S, placement_wait_s=WAIT_S)


def worker(name: str, model: str | None = None, *, state: str | None = None, since: float = NOW - 1000,
           slots: int = 2, busy: int = 0, can_load: tuple[str, ...] = (A, B), mb: int = 100,
           memory_mb: int | None = None, init: dict[str, Any] | None = None,
           ids: dict[str, str] | None = None) -> dict[str, Any]:
    """A heartbeat as a worker publishes it."""
    ids = ids or IDS
    return {"worker": name, "model": model, "model_id": ids[model] if model else None,
            "queue": f"llama.{model}" if model else None,
            "state": state or (SERVING if model else IDLE), "since": since, "slots": slots, "busy": busy,
            "jobs": busy, "gpus": [], "n_ctx": 2048,
            "can_load": [{"model": m, "model_id": ids[m], "mb": mb} for m in can_load],
            "memory_mb": memory_mb, "init": init}


def wants(model: str, queued: int = 0, *, waited_s: float = 10.0, running: int = 0, bid: float = 1.0,
          sequences: int | None = None) -> Demand:
    return Demand(model, queued, queued if sequences is None else sequences,
                  NOW - waited_s if queued else None, int(bid * 1_000_000), running)


def demand(*items: Demand) -> dict[str, Demand]:
    return {d.model: d for d in items}


def moved(moves: list[placement.Move]) -> list[tuple[str, str]]:
    return [(m.worker, m.to_model) for m in moves]


def test_an_idle_worker_is_placed_at_once_towards_the_model_that_waits(settings: HerderSettings) -> None:
    herd = [worker("w1"), worker("w2", A, busy=2)]
    # Nothing has waited long (0.1 s < placement_wait_s), nobody serves B: the idle worker goes now.
    [move] = decide(herd, demand(wants(B, 3, waited_s=0.1)), NOW, settings, IDS)
    assert (move.worker, move.from_model, move.to_model) == ("w1", None, B)
    assert "w1 is idle" in move.reason and f"{B} has 3 job(s) queued" in move.reason
    assert "no worker serving it" in move.reason
    # Nothing queued anywhere: nobody moves.
    assert decide(herd, demand(wants(A, 0, running=2)), NOW, settings, IDS) == []


def test_the_dwell_keeps_a_worker_on_its_model_until_it_has_served_it_long_enough(
        settings: HerderSettings) -> None:
    recent = [worker("w1", A, since=NOW - DWELL_S + 1)]
    assert decide(recent, demand(wants(B, 5)), NOW, settings, IDS) == []
    settled = [worker("w1", A, since=NOW - DWELL_S - 1)]
    [move] = decide(settled, demand(wants(B, 5)), NOW, settings, IDS)
    assert (move.worker, move.from_model, move.to_model) == ("w1", A, B)
    assert f"has served {A} for 31s" in move.reason and f"nothing of {A} is queued" in move.reason


def test_a_worker_leaves_another_model_only_once_the_queue_has_waited(settings: HerderSettings) -> None:
    herd = [worker("w1", A), worker("w2", B, busy=2)]
    # B is served (w2) and its queue is young: w1 stays on A.
    assert decide(herd, demand(wants(B, 4, waited_s=WAIT_S - 1)), NOW, settings, IDS) == []
    assert moved(decide(herd, demand(wants(B, 4, waited_s=WAIT_S + 1)), NOW, settings, IDS)) == [("w1", B)]


def test_the_last_worker_of_a_model_with_queued_work_is_never_taken(settings: HerderSettings) -> None:
    lone = [worker("w1", A, busy=2)]
    # B waits with nobody serving it and a far better bid; A's one worker still stays.
    assert decide(lone, demand(wants(A, 1), wants(B, 50, bid=10)), NOW, settings, IDS) == []
    # With a second worker on A, one of them goes (B has none), and A keeps the other.
    two = [worker("w1", A, busy=2), worker("w2", A, busy=1)]
    [move] = decide(two, demand(wants(A, 1), wants(B, 50, bid=10)), NOW, settings, IDS)
    assert move.to_model == B and move.worker == "w2"  # the less busy one
    assert f"{A} keeps 2 slot(s)" in move.reason


def test_a_quiet_model_keeps_the_slots_its_running_work_needs(settings: HerderSettings) -> None:
    # Nothing of A is queued but 3 sequences run: whichever worker left, 2 slots would stay for 3.
    herd = [worker("w1", A, busy=1), worker("w2", A, busy=0)]
    assert decide(herd, demand(wants(A, 0, running=3), wants(B, 2)), NOW, settings, IDS) == []
    # 2 running fit the 2 slots that stay: the less busy worker goes.
    assert moved(decide(herd, demand(wants(A, 0, running=2), wants(B, 2)), NOW, settings, IDS)) == [("w2", B)]
    # Its last worker leaves only once nothing of A runs (no job is left in flight with nobody to run it).
    assert decide(herd[:1], demand(wants(A, 0, running=1), wants(B, 2)), NOW, settings, IDS) == []
    assert moved(decide(herd[:1], demand(wants(B, 2)), NOW, settings, IDS)) == [("w1", B)]


def test_a_gap_between_bursts_does_not_make_a_busy_model_look_idle(settings: HerderSettings) -> None:
    herd = [worker("w1", A), worker("w2", A), worker("b1", B, busy=2)]
    # Nothing of A queued or running this instant, but its jobs kept 3 slots busy on average lately.
    lately_busy = demand(wants(A, 0, running=0), wants(B, 6))
    lately_busy[A] = Demand(A, load=3.0)
    assert decide(herd, lately_busy, NOW, settings, IDS) == []
    lately_busy[A] = Demand(A, load=1.5)  # 2 slots stay for it: one may go
    assert moved(decide(herd, lately_busy, NOW, settings, IDS)) == [("w1", B)]
    # A model nobody serves gets a worker even so: only what runs now must stay covered.
    lately_busy[A] = Demand(A, load=3.0)
    assert moved(decide(herd[:2], lately_busy, NOW, settings, IDS)) == [("w1", B)]


def test_only_a_model_the_worker_can_load_with_the_same_id_in_its_memory(settings: HerderSettings) -> None:
    wanted = demand(wants(B, 3))
    assert decide([worker("w1", can_load=(A,))], wanted, NOW, settings, IDS) == []
    # The worker's file of that name is another model (another sha256): not sent.
    assert decide([worker("w1", ids={A: IDS[A], B: "c" * 64})], wanted, NOW, settings, IDS) == []
    assert decide([worker("w1", mb=900, memory_mb=512)], wanted, NOW, settings, IDS) == []
    assert moved(decide([worker("w1", mb=512, memory_mb=512)], wanted, NOW, settings, IDS)) == [("w1", B)]
    assert moved(decide([worker("w1", mb=10**6, memory_mb=None)], wanted, NOW, settings, IDS)) == [("w1", B)]
    # A model this herder's registry does not have is not placed.
    assert decide([worker("w1")], demand(wants("elsewhere", 3)), NOW, settings, IDS) == []


def test_a_model_whose_queue_waits_without_a_worker_says_why(settings: HerderSettings) -> None:
    herd = [worker("w1", A, since=NOW - 5), worker("w2", can_load=(A,)), worker("w3", A, state=LOADING, init={
        "nonce": "n", "model": A, "outcome": ACCEPTED, "reason": "", "at": NOW})]
    decided = placement.plan(herd, demand(wants(B, 3)), NOW, settings, IDS)
    assert decided.moves == []
    why = decided.waiting[B]
    assert why.startswith(f"{B} has 3 job(s) queued")
    assert "w1 has served smollm2 for 5s of its 30s" in why and "w2 cannot load it" in why
    assert "w3 is on its way to smollm2" in why
    assert placement.plan([], demand(wants(B, 3)), NOW, settings, IDS).waiting[B].endswith("there is no other worker")
    # A model whose queue is covered is not waiting.
    assert placement.plan([worker("w4")], demand(wants(B, 1)), NOW, settings, IDS).waiting == {}


def test_a_model_some_worker_could_load_is_one_placement_can_serve() -> None:
    assert placement.could_serve([worker("w1", A, can_load=(A, B))], B, IDS[B], NOW)
    assert not placement.could_serve([worker("w1", A, can_load=(A,))], B, IDS[B], NOW)
    assert not placement.could_serve([worker("w1", mb=900, memory_mb=512)], B, IDS[B], NOW)
    assert not placement.could_serve([worker("w1")], B, "c" * 64, NOW)  # another file under that name
    assert not placement.could_serve([], B, IDS[B], NOW)


def test_a_refused_model_is_not_sent_again_for_a_while(settings: HerderSettings) -> None:
    refused = {"nonce": "n1", "model": B, "outcome": REFUSED, "reason": "sha256 mismatch", "at": NOW - 10}
    assert decide([worker("w1", init=refused)], demand(wants(B, 3)), NOW, settings, IDS) == []
    older = refused | {"at": NOW - placement.REFUSED_BACKOFF_S - 1}
    assert moved(decide([worker("w1", init=older)], demand(wants(B, 3)), NOW, settings, IDS)) == [("w1", B)]


def test_workers_already_on_their_way_are_the_model_s_coming_supply(settings: HerderSettings) -> None:
    accepted = {"nonce": "n1", "model": B, "outcome": ACCEPTED, "reason": "", "at": NOW - 1}
    for state in (DRAINING, LOADING):
        herd = [worker("w1", A, state=state, init=accepted), worker("w2"), worker("w3")]
        # w1's two slots cover B's two queued sequences: nobody else moves, and w1 is not moved again.
        assert decide(herd, demand(wants(B, 2)), NOW, settings, IDS) == []
        # Five need more than w1 brings: one more (2 + 2 < 5: and then a third).
        assert moved(decide(herd, demand(wants(B, 5)), NOW, settings, IDS)) == [("w2", B), ("w3", B)]
    # An Init sent that the heartbeat does not show yet counts the same.
    herd = [worker("w1"), worker("w2")]
    sent = {"w1": Pending("w1", B, "n2", NOW - 0.5)}
    assert decide(herd, demand(wants(B, 2)), NOW, settings, IDS, sent) == []
    # One decision never moves two workers for the backlog one covers.
    assert moved(decide(herd, demand(wants(B, 2)), NOW, settings, IDS)) == [("w1", B)]


def test_an_init_on_its_way_is_settled_by_the_heartbeat_that_shows_it() -> None:
    sent = Pending("w1", B, "n1", NOW)
    loading = worker("w1", A, state=LOADING,
                     init={"nonce": "n1", "model": B, "outcome": ACCEPTED, "reason": "", "at": NOW})
    assert not sent.settled([worker("w1", A)], NOW + 1)
    assert sent.settled([loading], NOW + 1)
    assert sent.settled([], NOW + 1)  # its worker is gone
    assert sent.settled([worker("w1", A)], NOW + placement.PENDING_TTL_S + 1)  # expired unread


def test_two_busy_models_trade_a_worker_only_past_the_hysteresis(settings: HerderSettings) -> None:
    herd = [worker("a1", A, busy=2), worker("a2", A, busy=2), worker("b1", B, busy=2)]
    # B: 6 over 2 slots = 3 per slot; A without a2: 10 over 2 = 5. B is not twice worse: nothing moves.
    assert decide(herd, demand(wants(A, 10), wants(B, 6)), NOW, settings, IDS) == []
    # B: 30 over 2 = 15 ≥ 2 × 5: one of A's moves, and only one (then B: 30/4 = 7.5 < 2 × 10/0…).
    [move] = decide(herd, demand(wants(A, 10), wants(B, 30)), NOW, settings, IDS)
    assert move.to_model == B and move.from_model == A
    assert "backlog per slot is at least 2x" in move.reason
    # Bids weigh in: the same queues, B's bid three times A's.
    assert moved(decide(herd, demand(wants(A, 10), wants(B, 12, bid=3)), NOW, settings, IDS)) == [(move.worker, B)]


class World:
    """A scripted herd over ticks of one second: arrivals queue, each serving slot ends one job a tick,
    an Init takes ``load_ticks`` to load, and the heartbeats and the demand say so."""

    def __init__(self, workers: int, slots: int = 2, load_ticks: int = 2) -> None:
        self.now = NOW
        self.slots, self.load_ticks = slots, load_ticks
        self.herd = {f"w{i}": worker(f"w{i}", slots=slots, since=NOW) for i in range(workers)}
        #: Each model's queued jobs by arrival time, oldest first.
        self.queue: dict[str, deque[float]] = {A: deque(), B: deque()}
        self.loading: dict[str, tuple[str, float]] = {}
        self.moves: list[tuple[float, str, str | None, str]] = []
        #: Sequences run per tick, per model, newest last.
        self.history: dict[str, deque[int]] = {m: deque(maxlen=int(placement.LOAD_WINDOW_S)) for m in (A, B)}

    def tick(self, settings: HerderSettings, arrivals: dict[str, int]) -> None:
        self.now += 1
        for name, (model, done_at) in list(self.loading.items()):
            if self.now >= done_at:
                self.herd[name] |= {"model": model, "state": SERVING, "since": self.now,
                                    "init": {"nonce": name, "model": model, "outcome": LOADED, "at": self.now}}
                del self.loading[name]
        for model, n in arrivals.items():
            self.queue[model].extend([self.now] * n)
        running: Counter[str] = Counter()
        for doc in self.herd.values():
            if doc["state"] == SERVING:
                doc["busy"] = min(len(self.queue[doc["model"]]), doc["slots"])
                for _ in range(doc["busy"]):
                    self.queue[doc["model"]].popleft()
                running[doc["model"]] += doc["busy"]
        for m in self.history:
            self.history[m].append(running[m])
        wanted = {m: Demand(m, len(q), len(q), q[0] if q else None, 1_000_000, running[m],
                            sum(self.history[m]) / placement.LOAD_WINDOW_S)
                  for m, q in self.queue.items()}
        for move in decide(list(self.herd.values()), wanted, self.now, settings, IDS):
            self.moves.append((self.now, move.worker, move.from_model, move.to_model))
            self.herd[move.worker] |= {"state": LOADING, "since": self.now, "busy": 0,
                                       "init": {"nonce": move.worker, "model": move.to_model,
                                                "outcome": ACCEPTED, "at": self.now}}
            self.loading[move.worker] = (move.to_model, self.now + self.load_ticks)

    def serving(self, model: str) -> int:
        return sum(1 for d in self.herd.values() if d["state"] == SERVING and d["model"] == model)

    def queued(self) -> dict[str, int]:
        return {m: len(q) for m, q in self.queue.items()}


@pytest.mark.parametrize(("dwell_s", "wait_s", "busy", "both"), [(10.0, 2.0, 6, 3), (5.0, 1.0, 7, 4), (10.0, 0.0, 6, 3)])
def test_no_flapping_over_a_trace_of_a_then_b_then_both(settings: HerderSettings, dwell_s: float, wait_s: float,
                                                        busy: int, both: int) -> None:
    settings = settings.model_copy(update={"placement_dwell_s": dwell_s, "placement_wait_s": wait_s})
    world = World(workers=4)
    phases = [({A: busy}, 40), ({B: busy}, 40), ({A: both, B: both}, 60)]
    seen = []
    for arrivals, ticks in phases:
        for t in range(ticks):
            # Arrivals come and go by the tick (one tick in three has none): demand that wobbles.
            world.tick(settings, arrivals if t % 3 else {})
        seen.append((world.serving(A), world.serving(B), world.queued()))
    (a1, b1, _), (a2, b2, _), (a3, b3, q3) = seen
    assert a1 >= 3 and b2 >= 3  # each phase's model got the herd
    assert a3 >= 1 and b3 >= 1 and max(q3.values()) <= 12  # both are served at the end, neither starved
    # No worker moved back and forth within the dwell, and the moves are few: 4 placed, then each
    # phase change moves at most the whole herd once.
    last: dict[str, tuple[float, str | None]] = {}
    for at, name, _old, new in world.moves:
        if name in last:
            assert at - last[name][0] >= settings.placement_dwell_s, world.moves
        last[name] = (at, new)
    assert len(world.moves) <= 4 + 4 + 4, world.moves
    reversals = [m for m in world.moves if m[2] is not None and sum(
        1 for n in world.moves if n[1] == m[1] and n[3] == m[2] and n[0] > m[0] and n[0] - m[0] < 2 * dwell_s)]
    assert reversals == [], world.moves


# --- the demand query on a real ledger ---------------------------------------------------------


def test_demand_counts_what_waits_and_runs_per_model(herder: Herder) -> None:
    key = herder.account("alice", 10**9)
    herder.submit(key, now=T0, model=A)
    herder.submit(key, now=T0 + 1, model=A, n=2, multiplier=3)
    herder.submit(key, now=T0 + 2, model=A)
    done = herder.submit(key, now=T0 + 3, model=B)
    herder.submit(key, now=T0 + 5, model=B)
    herder.claim(1, now=T0 + 6, model=A)  # the best bid starts: 2 sequences of A run
    herder.claim(1, now=T0 + 6, model=B)
    assert herder.settle(herder.result(done.id, "Hello."), now=T0 + 8) is not None
    with herder.sessions.begin() as session:
        found = placement.demand(session, T0 + 10)
    # The 2 sequences of A have run for 4 s of the last 10: a load of 0.8 slots; B's one ran 2 s.
    assert found[A] == Demand(A, queued=2, sequences=2, oldest_at=T0, best_bid_ppm=1_000_000, running=2,
                              load=pytest.approx(0.8))
    assert found[B] == Demand(B, queued=1, sequences=1, oldest_at=T0 + 5, best_bid_ppm=1_000_000, running=0,
                              load=pytest.approx(0.2))
    assert found[A].wait_s(T0 + 10) == 10.0


# --- the herder's placement step: real Redis, a real ledger, signed Inits ----------------------


class ScriptedHerd:
    """A herd source whose heartbeats the test writes."""

    def __init__(self, docs: list[dict[str, Any]]) -> None:
        self.docs = docs

    def __call__(self, fresh: bool = False) -> list[dict[str, Any]]:
        return [dict(d) for d in self.docs]


def test_the_herder_sends_one_signed_init_per_move_and_keeps_the_decision(
        tmp_path: Path, redis_url: str, ledger_url: str, counter: TokenCounter) -> None:
    r = redis_lib.Redis.from_url(redis_url)
    r.delete(PLACEMENT_LOCK, PLACEMENT_PENDING, PLACEMENT_DECISIONS, PLACEMENT_WAITING,
             control.CONTROL_PREFIX + "idle@test")
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, database_url=ledger_url, placement="demand")
    clock = [NOW]
    herd = ScriptedHerd([])
    svc = stub.build(settings, herd=herd, counter=counter, clock=lambda: clock[0])
    models = svc.counter.models()
    ids = {name: spec.model_id for name, spec in models.items()}
    idle = worker("idle@test", ids=ids, can_load=tuple(models))
    herd.docs = [idle]
    with svc.sessions.begin() as session:
        _, key = ledger.create_account(session, "alice", 10**9)
    sub = Submission(prompt="Say hello.", max_tokens=8, model=B)
    # Nobody serves B, but the idle worker could: admitted, held and queued, waiting for placement.
    assert svc.submit(key, sub)["state"] == "queued"

    # No worker at all: nothing moves, and the dashboard is told why B waits.
    herd.docs = []
    assert svc.place() == [] and placement_store.waiting(r)[B].endswith("there is no other worker")
    herd.docs = [idle]
    [move] = svc.place()
    assert (move.worker, move.to_model) == ("idle@test", B)
    assert placement_store.waiting(r) == {}
    envelope = control.receive(r, "idle@test", timeout_s=1)
    init = control.accept(r, envelope, svc.public_key, "idle@test", NOW + 1, started_at=NOW - 10)
    assert (init.model, init.model_id) == (B, ids[B])
    [kept] = placement_store.decisions(r)
    assert kept["worker"] == "idle@test" and kept["to"] == B and kept["nonce"] == init.nonce
    assert "Say hello" not in json.dumps(kept)  # no text of any job
    # The next tick, before the heartbeat shows the Init, sends nothing more.
    clock[0] = NOW + 1
    assert svc.place() == [] and r.llen(control.CONTROL_PREFIX + "idle@test") == 0
    # Once it shows it (loading B), the pending entry is dropped and the heartbeat speaks instead.
    herd.docs = [idle | {"state": LOADING, "init": {
        "nonce": init.nonce, "model": B, "outcome": ACCEPTED, "reason": "", "at": NOW + 1}}]
    assert svc.place() == [] and r.hlen(PLACEMENT_PENDING) == 0
    # Another herder holding the lock: this one places nothing this tick.
    herd.docs = [worker("other@test", ids=ids, can_load=tuple(models))]
    r.set(PLACEMENT_LOCK, "another herder", px=5000)
    assert svc.place() == []
    r.delete(PLACEMENT_LOCK)
    # With placement off, the tick never places.
    svc.settings = settings.model_copy(update={"placement": "off"})
    assert "placed" not in svc.tick()
    svc.settings = settings
    assert svc.tick()["placed"] == 1
    r.delete(PLACEMENT_PENDING, PLACEMENT_DECISIONS, PLACEMENT_WAITING, control.CONTROL_PREFIX + "other@test")


def test_no_init_moves_an_operators_worker_to_a_model_its_broker_user_does_not_reach(
        tmp_path: Path, redis_url: str, ledger_url: str, counter: TokenCounter) -> None:
    r = redis_lib.Redis.from_url(redis_url)
    r.delete(PLACEMENT_LOCK, PLACEMENT_PENDING, PLACEMENT_DECISIONS, PLACEMENT_WAITING)
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, database_url=ledger_url, placement="demand")
    herd = ScriptedHerd([])
    svc = stub.build(settings, herd=herd, counter=counter, clock=lambda: NOW)
    ids = {name: spec.model_id for name, spec in svc.counter.models().items()}
    with svc.sessions.begin() as session:
        _, key = ledger.create_account(session, "alice", 10**9)
        ledger.create_account(session, "op", 0)
        broker_access.create(session, broker_access.OPERATOR, "op", [A])  # its workers may take A's queue only
    herd.docs = [worker("op/w@test", ids=ids, can_load=(A, B))]
    # The only worker has B's file, but its operator's credential does not reach B's queue: no worker
    # can serve B, so a request for it is refused at once, with nothing held.
    with pytest.raises(NoWorkers):
        svc.submit(key, Submission(prompt="Say hello.", max_tokens=8, model=B))
    # A request admitted anyway (a house worker that could have served it left) waits, and no Init goes out.
    herd.docs.append(worker("w@house", ids=ids, can_load=(B,)))
    assert svc.submit(key, Submission(prompt="Say hello.", max_tokens=8, model=B))["state"] == "queued"
    herd.docs.pop()
    assert svc.place() == [] and r.llen(control.CONTROL_PREFIX + "op/w@test") == 0
    with svc.sessions.begin() as session:
        assert broker_access.within_reach(session, herd.docs[0])["can_load"] == [
            {"model": A, "model_id": ids[A], "mb": 100}]
        house = worker("w@house", ids=ids)
        assert broker_access.within_reach(session, house) == house
    r.delete(PLACEMENT_LOCK, PLACEMENT_PENDING, PLACEMENT_DECISIONS, PLACEMENT_WAITING)
