"""The agent end to end: real Redis, the herder with beat, a SmolLM2 worker, and a real agent
worker (``celery -A agent worker -B``) ticking every 0.5 s, on SQLite and PostgreSQL ledgers.

The rooms are ones SmolLM2 grades reliably with the default method (greedy,
so always the same way): ``pos-027`` and ``neg-047`` of the shipped labelled rooms.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from agent.constants import CHAT_POLLS_PREFIX, RESPONSE_TASK
from agent.rooms import shipped
from agent.scoring import whole_grade
from agent.world import World
from tests.agent.conftest import DEPOSIT

pytestmark = pytest.mark.slow

SAMPLE = {r.room: r for r in shipped()}
POSITIVE_ROOM, NEGATIVE_ROOM = "pos-027", "neg-047"


def post_room(world: World, sample_room: str) -> str:
    """Copy a labelled room into a fresh chat room; returns its name."""
    room = f"{sample_room}-{uuid.uuid4().hex[:6]}"
    for m in SAMPLE[sample_room].messages:
        world.broadcast(room, m.nick, m.text)
    return room


def test_a_clearly_positive_room_leads_to_one_filled_buy(stack, start_agent, r):
    key, _ = stack.account(100_000)
    agent = start_agent(key, post_room(World(r), POSITIVE_ROOM))
    agent.wait(lambda: agent.summary().buy == 1, "a buy")
    [order] = agent.exchange.orders("agent")
    assert order.filled and (order.spent, order.received) == (1_000, 4)
    assert agent.exchange.balances("agent") == {"CRED": DEPOSIT - 1_000, "LLAMA": 4}
    [tick] = agent.ticks()
    grade = agent.store.grade_of(tick.id)
    assert tick.order_status == "filled" and grade is not None and grade.expected > 3
    assert tick.grade == whole_grade(grade.expected)
    # Later beats find nothing new: the agent pays for that room once.
    mark = agent.log().count("nothing new since the last grade")
    agent.wait(lambda: agent.log().count("nothing new since the last grade") >= mark + 3, "three more beats")
    s = agent.summary()
    assert (s.requests, s.buy, s.skip, s.error) == (1, 1, 0, 0)
    assert stack.balance(key) == 100_000 - s.spend and s.spend == tick.charged > 0
    assert stack.books() == []


def test_a_clearly_negative_room_leads_to_a_skip(stack, start_agent, r):
    key, _ = stack.account(100_000)
    agent = start_agent(key, post_room(World(r), NEGATIVE_ROOM))
    agent.wait(lambda: agent.summary().skip == 1, "a skip")
    [tick] = agent.ticks()
    grade = agent.store.grade_of(tick.id)
    assert grade is not None and grade.expected < 3
    assert tick.reason == f"grade {tick.grade} (expected {grade.expected:.2f}) is not above 3"
    assert agent.exchange.orders("agent") == []
    assert agent.exchange.balances("agent") == {"CRED": DEPOSIT, "LLAMA": 0}
    assert stack.balance(key) == 100_000 - agent.summary().spend


def test_an_account_without_funds_is_an_error_with_the_reason_and_no_order(stack, start_agent, r):
    key, _ = stack.account(0)
    agent = start_agent(key, post_room(World(r), POSITIVE_ROOM))
    agent.wait(lambda: agent.summary().error >= 1, "an error")
    tick = agent.ticks()[-1]
    assert tick.reason is not None and tick.reason.startswith("InsufficientFunds: account ")
    assert tick.job_id is None and tick.charged is None
    s = agent.summary()
    assert (s.requests, s.buy, s.spend) == (0, 0, 0)
    assert agent.exchange.orders("agent") == [] and stack.balance(key) == 0


def test_a_duplicated_inference_response_places_a_single_order(stack, start_agent, r):
    from router.herder.app import app as herder_app

    key, herder = stack.account(100_000)
    agent = start_agent(key, post_room(World(r), POSITIVE_ROOM))
    agent.wait(lambda: agent.summary().buy == 1, "a buy")
    [tick] = agent.ticks()
    response: dict[str, Any] = herder.job(tick.job_id).doc["response"]
    assert response["reference"] == tick.reference
    for _ in range(2):
        herder_app.send_task(RESPONSE_TASK, args=[response], queue=agent.queue)
    agent.wait(lambda: agent.summary().duplicates == 2, "both duplicates handled")
    assert len(agent.exchange.orders("agent")) == 1
    s = agent.summary()
    assert (s.buy, s.requests, s.spend) == (1, 1, response["charged"])
    assert agent.exchange.balances("agent") == {"CRED": DEPOSIT - 1_000, "LLAMA": 4}


def test_the_chatbot_replies_once_to_another_speaker_and_never_to_itself(stack, start_agent, r):
    key, _ = stack.account(100_000)
    world = World(r)
    chat_room = f"chat-{uuid.uuid4().hex[:6]}"
    agent = start_agent(key, f"quiet-{uuid.uuid4().hex[:6]}", chat_room=chat_room, chat_nick="llamabot",
                        chat_interval_s="0.2")

    def bot_messages() -> list[Any]:
        return [m for m in world.history(chat_room, 50) if m.nick == "llamabot"]

    def polls() -> int:
        return int(r.get(CHAT_POLLS_PREFIX + chat_room) or 0)

    asked = world.broadcast(chat_room, "alice", "Good morning llamas, who wants some fresh hay?")
    [first] = agent.wait(bot_messages, "the bot's reply")
    assert first.id > asked.id and first.text.strip() and "\n" not in first.text
    # The bot keeps looking; its own message is the newest, so it stays quiet.
    seen = polls()
    agent.wait(lambda: polls() >= seen + 5, "five more looks at the room")
    assert len(bot_messages()) == 1
    world.broadcast(chat_room, "bob", "I do! Is it the sweet kind?")
    agent.wait(lambda: len(bot_messages()) == 2, "a reply to bob")
    seen = polls()
    agent.wait(lambda: polls() >= seen + 5, "five more looks at the room")
    history = world.history(chat_room, 50)
    assert [m.nick for m in history] == ["alice", "llamabot", "bob", "llamabot"]
    assert "CHAT     duplicate" not in agent.log()
