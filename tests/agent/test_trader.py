"""The trader's plain methods on a real Redis, store and exchange.

The herder is replaced only where that proves something the real one cannot:
a poison herder (every use fails the test) proves that handling a response
never pays, and a scripted one times out at the exact moment after the tick
was recorded, to prove the retry pays under the same reference.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent.exchange import PaperExchange
from agent.grading import method
from agent.settings import AgentSettings
from agent.store import REQUESTED, SUBMITTING, OutcomeStore
from agent.strategy import BUY, ERROR, SKIP
from agent.trader import Trader
from agent.world import World
from router.core.errors import InsufficientFunds
from tests.agent.conftest import DEPOSIT, PRICE

POSITIVE = [("ana", "We won the hackathon!!"), ("ben", "Incredible, congratulations!"), ("cleo", "Brilliant.")]


class PoisonHerder:
    """A herder that fails the test when used at all."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"the herder must not be used here (Herder.{name})")


class ScriptedHerder:
    """Answers ``run`` from a script: an exception to raise, or a job id to admit."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.calls: list[dict[str, Any]] = []

    def run(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        step = self.script.pop(0)
        if isinstance(step, BaseException):
            raise step
        return SimpleNamespace(id=step, doc={"job_id": step, "offered": 160})


def make_trader(herder: Any, world: World, store: OutcomeStore, exchange: PaperExchange, room: str,
                tmp_path: Path, deposit: int = DEPOSIT) -> Trader:
    settings = AgentSettings(home=tmp_path, agent_room=room, agent_api_key="key", agent_price=PRICE)
    exchange.open_account(settings.agent_exchange_account, {"CRED": deposit, "LLAMA": 0})
    return Trader(settings, herder, world, store, exchange, method("fewshot"))


def response(tick_id: str, text: str = " positive", status: str = "done") -> dict[str, Any]:
    return {"job_id": f"job-{tick_id}", "reference": f"agent:{tick_id}", "status": status, "text": text,
            "charged": 150, "offered": 160, "error": None, "message": None}


def post(world: World, room: str, lines: list[tuple[str, str]] = POSITIVE) -> None:
    for nick, text in lines:
        world.broadcast(room, nick, text)


def test_a_positive_response_buys_once_and_its_duplicate_changes_nothing(world, store, exchange, room, tmp_path):
    trader = make_trader(PoisonHerder(), world, store, exchange, room, tmp_path)
    store.begin("t1", room, "agent:t1", "1-0", "{}", 100.0)
    assert trader.on_response(response("t1")) == BUY
    assert trader.on_response(response("t1")) is None
    assert len(exchange.orders("agent")) == 1 and exchange.balances("agent") == {"CRED": DEPOSIT - 1_000, "LLAMA": 4}
    s = store.summary()
    assert (s.buy, s.duplicates, s.spend) == (1, 1, 150)


def test_concurrent_duplicates_of_a_response_place_one_order(world, store, exchange, room, tmp_path, db_url):
    store.begin("t1", room, "agent:t1", "1-0", "{}", 100.0)
    exchange.open_account("agent", {"CRED": DEPOSIT, "LLAMA": 0})
    traders = [make_trader(PoisonHerder(), world, OutcomeStore.open(db_url), PaperExchange.open(db_url, exchange.feed),
                           room, tmp_path) for _ in range(4)]
    start = threading.Barrier(len(traders))

    def handle(trader: Trader) -> str | None:
        start.wait()
        return trader.on_response(response("t1"))

    try:
        with ThreadPoolExecutor(len(traders)) as pool:
            outcomes = list(pool.map(handle, traders))
    finally:
        for t in traders:
            t.store.close()
            t.exchange.close()  # type: ignore[attr-defined]
    assert outcomes.count(BUY) == 1 and outcomes.count(None) == 3
    assert len(exchange.orders("agent")) == 1 and store.summary().duplicates == 3


def test_negative_factual_unreadable_and_failed_responses(world, store, exchange, room, tmp_path):
    trader = make_trader(PoisonHerder(), world, store, exchange, room, tmp_path)
    for tick_id in ("neg", "fact", "junk", "failed"):
        store.begin(tick_id, room, f"agent:{tick_id}", "1-0", "{}", 100.0)
    assert trader.on_response(response("neg", " negative")) == SKIP
    assert trader.on_response(response("fact", " factual")) == SKIP
    assert trader.on_response(response("junk", "¯\\_(ツ)_/¯")) == ERROR
    assert trader.on_response(response("failed", "", status="failed")) == ERROR
    assert exchange.orders("agent") == []
    assert "cannot read the answer" in (store.get("junk").reason or "")


def test_a_rejected_order_is_an_error_with_the_exchanges_reason(world, store, exchange, room, tmp_path):
    trader = make_trader(PoisonHerder(), world, store, exchange, room, tmp_path, deposit=10)
    store.begin("t1", room, "agent:t1", "1-0", "{}", 100.0)
    assert trader.on_response(response("t1")) == ERROR
    assert store.get("t1").reason == "order rejected: insufficient CRED: has 10, needs 1000"


def test_a_response_that_is_not_ours_is_ignored(world, store, exchange, room, tmp_path):
    trader = make_trader(PoisonHerder(), world, store, exchange, room, tmp_path)
    assert trader.on_response(response("unknown")) is None
    assert trader.on_response({"reference": "chat:lobby:1-0", "status": "done"}) is None


def test_a_tick_whose_herder_times_out_is_paid_later_under_the_same_reference(world, store, exchange, room,
                                                                              tmp_path):
    post(world, room)
    herder = ScriptedHerder(TimeoutError("no answer"), "job1")
    trader = make_trader(herder, world, store, exchange, room, tmp_path)
    with pytest.raises(TimeoutError):
        trader.tick("t1", now=100.0)
    assert store.get("t1").state == SUBMITTING
    world.broadcast(room, "dev", "Something new was said meanwhile.")
    tick = trader.tick("t2", now=101.0)  # the next beat finishes t1 rather than grading anew
    assert tick is not None and (tick.id, tick.state, tick.job_id) == ("t1", REQUESTED, "job1")
    assert store.get("t2") is None
    first, second = herder.calls
    assert first == second and first["reference"] == "agent:t1"
    assert first["callback"] == ("agent.inference_response", "agent") and first["temperature"] == 0.0


def test_a_refused_tick_is_an_error_and_the_room_is_tried_again(world, store, exchange, room, tmp_path):
    post(world, room)
    herder = ScriptedHerder(InsufficientFunds("acct", 0, 155), "job2")
    trader = make_trader(herder, world, store, exchange, room, tmp_path)
    trader.tick("t1", now=100.0)
    assert store.get("t1").state == ERROR
    assert store.get("t1").reason == "InsufficientFunds: account acct has 0, needs 155"
    assert trader.tick("t2", now=101.0).state == REQUESTED  # nothing was paid for t1: grade again
    assert trader.tick("t3", now=102.0) is None  # t2 is in flight
    trader.on_response(response("t2"))
    assert trader.tick("t4", now=103.0) is None  # nothing new since t2
    assert len(herder.calls) == 2


def test_an_empty_room_costs_nothing(world, store, exchange, room, tmp_path):
    trader = make_trader(PoisonHerder(), world, store, exchange, room, tmp_path)
    assert trader.tick("t1") is None and store.summary().requests == 0


def test_a_tick_without_a_response_ends_as_an_error_after_the_timeout(world, store, exchange, room, tmp_path):
    post(world, room)
    trader = make_trader(ScriptedHerder("job1"), world, store, exchange, room, tmp_path)
    trader.tick("t1", now=100.0)
    trader.tick("t2", now=100.0 + trader.settings.agent_response_timeout_s + 1)
    assert store.get("t1").state == ERROR and store.get("t1").reason == "no response within 900s"
