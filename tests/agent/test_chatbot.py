"""The chatbot's rules, and its Redis guard on the real Redis.

A scripted herder stands in only to hold a reply "in flight" for as long as
the test needs — the moment the real herder would pass too quickly to test.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from agent import chatbot
from agent.chatbot import ChatBot
from agent.settings import AgentSettings
from agent.world import ChatMessage, World
from router.core.errors import InsufficientFunds


class ScriptedHerder:
    """Records each request; raises a scripted exception or admits it."""

    def __init__(self, *script: Any) -> None:
        self.script = list(script)
        self.calls: list[dict[str, Any]] = []

    def run(self, **kwargs: Any) -> Any:
        self.calls.append(kwargs)
        step = self.script.pop(0) if self.script else None
        if isinstance(step, BaseException):
            raise step
        return SimpleNamespace(id=f"job{len(self.calls)}", doc={})


def make_bot(herder: Any, r: Any, room: str, tmp_path: Path) -> ChatBot:
    settings = AgentSettings(home=tmp_path, agent_chat_room=room, agent_chat_nick="llamabot", agent_api_key="k")
    return ChatBot(settings, herder, r)


def reply(reference: str, text: str, status: str = "done") -> dict[str, Any]:
    return {"reference": reference, "status": status, "text": text, "job_id": "j"}


def test_the_bot_answers_the_newest_message_of_someone_else_once():
    msgs = [ChatMessage("1-0", "ana", "hi"), ChatMessage("2-0", "llamabot", "hello ana")]
    assert chatbot.to_answer(msgs, "llamabot", None) is None  # its own message is the newest
    assert chatbot.to_answer(msgs[:1], "llamabot", None) == msgs[0]
    assert chatbot.to_answer(msgs[:1], "llamabot", "1-0") is None
    assert chatbot.to_answer([], "llamabot", None) is None


def test_the_reply_is_cut_at_the_terminate_symbol():
    assert chatbot.cut('\n "Hay there, friend!"\nuser: more', "\n") == "Hay there, friend!"
    assert chatbot.cut("Short one. | rest", " | ") == "Short one."
    assert len(chatbot.cut("x" * 1000, "\n")) == chatbot.MAX_REPLY_CHARS
    assert chatbot.parse_reference(chatbot.reference_for("lobby", "17-3")) == ("lobby", "17-3")
    assert chatbot.parse_reference("agent:t1") is None


def test_never_two_replies_in_flight_and_a_duplicate_posts_nothing(r, room, tmp_path):
    world = World(r)
    herder = ScriptedHerder()
    bot = make_bot(herder, r, room, tmp_path)
    asked = world.broadcast(room, "ana", "Anyone seen my hay?")
    assert bot.poll() == "job1"
    world.broadcast(room, "ben", "Not me!")
    assert bot.poll() is None and bot.poll() is None  # the first reply is still in flight
    assert len(herder.calls) == 1 and herder.calls[0]["reference"] == f"chat:{room}:{asked.id}"
    assert bot.on_response(reply(f"chat:{room}:{asked.id}", "Check the barn!\nextra"))
    assert not bot.on_response(reply(f"chat:{room}:{asked.id}", "Check the barn!"))
    assert [(m.nick, m.text) for m in world.history(room, 10)] == [
        ("ana", "Anyone seen my hay?"), ("ben", "Not me!"), ("llamabot", "Check the barn!")]
    # Its own message is now the newest: nothing to answer, nothing asked.
    assert bot.poll() is None and len(herder.calls) == 1
    assert bot.in_flight() is None and bot.answered() == asked.id


def test_a_refused_reply_frees_the_bot_and_skips_that_message(r, room, tmp_path):
    herder = ScriptedHerder(InsufficientFunds("acct", 0, 90))
    bot = make_bot(herder, r, room, tmp_path)
    asked = World(r).broadcast(room, "ana", "hello?")
    assert bot.poll() is None
    assert bot.in_flight() is None and bot.answered() == asked.id
    assert bot.poll() is None and len(herder.calls) == 1


def test_a_herder_that_does_not_answer_leaves_the_message_to_the_next_look(r, room, tmp_path):
    herder = ScriptedHerder(TimeoutError("no answer"))
    bot = make_bot(herder, r, room, tmp_path)
    World(r).broadcast(room, "ana", "hello?")
    try:
        bot.poll()
    except TimeoutError:
        pass
    assert bot.in_flight() is None and bot.answered() is None
    assert bot.poll() == "job2"


def test_a_failed_job_posts_nothing_but_frees_the_bot(r, room, tmp_path):
    bot = make_bot(ScriptedHerder(), r, room, tmp_path)
    asked = World(r).broadcast(room, "ana", "hello?")
    bot.poll()
    assert bot.on_response(reply(f"chat:{room}:{asked.id}", "", status="failed"))
    assert [m.nick for m in World(r).history(room, 5)] == ["ana"] and bot.in_flight() is None
