"""The chatbot: joins a room and answers whoever else speaks with a short witty reply.

It runs inside the agent's Celery app: beat asks it to look at its room every
``agent_chat_interval_s`` (one cheap XREVRANGE), and the herder forwards each
reply to ``agent.chat_response`` on the agent's queue — the same request and
response path as the trading agent, so it needs no thread or loop of its own.

Two Redis keys per room keep it honest: ``inflight`` holds the reference of
the one reply being generated (set only if absent: never two in flight), and
``answered`` the id of the last message dealt with. Posting the reply,
moving ``answered`` and clearing ``inflight`` happen in one Lua script, and
only for the reference that is in flight, so a duplicated response posts
nothing. The bot never answers a message of its own nickname.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import redis

from agent.constants import (
    CHAT_ANSWERED_PREFIX,
    CHAT_INFLIGHT_PREFIX,
    CHAT_POLLS_PREFIX,
    CHAT_RESPONSE_TASK,
    ROOM_MAXLEN,
    ROOM_PREFIX,
)
from agent.grading import transcript
from agent.settings import AgentSettings
from agent.strategy import refusal_reason
from agent.world import MAX_TEXT_CHARS, ChatMessage, World
from llama_tasks.errors import LlamasError
from router.client import Herder

log = logging.getLogger("agent.chatbot")

#: Prefix of the reference of every reply's request: ``chat:<room>:<message id>``.
CHAT_REFERENCE_PREFIX = "chat:"
#: Longest reply posted, in characters.
MAX_REPLY_CHARS = 280

# Post (or not), mark the message answered and clear the in-flight reference,
# all only if ARGV[1] is still the reference in flight.
_FINISH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] ~= '' then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[5], '*', 'nick', ARGV[4], 'text', ARGV[3])
end
redis.call('SET', KEYS[2], ARGV[2])
redis.call('DEL', KEYS[1])
return 1
"""

_COMPARE_AND_DELETE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


# --- pure rules ------------------------------------------------------------------


def to_answer(history: Sequence[ChatMessage], nick: str, answered_id: str | None) -> ChatMessage | None:
    """The message to reply to: the newest one, unless it is the bot's own or already dealt with."""
    if not history:
        return None
    newest = history[-1]
    if newest.nick == nick or newest.id == answered_id:
        return None
    return newest


def reply_messages(history: Sequence[ChatMessage], nick: str) -> list[dict[str, str]]:
    """Chat messages asking for one short witty reply to the newest message."""
    system = (f"You are {nick}, a witty llama in a group chat. "
              "Reply to the last message with one short, funny sentence.")
    return [{"role": "system", "content": system}, {"role": "user", "content": transcript(history)}]


def cut(text: str, terminate: str, limit: int = MAX_REPLY_CHARS) -> str:
    """The reply as posted: up to the terminate symbol, trimmed, without wrapping quotes."""
    reply = text.strip().split(terminate, 1)[0].strip()
    if len(reply) >= 2 and reply[0] == reply[-1] and reply[0] in "\"'":
        reply = reply[1:-1].strip()
    return reply[:min(limit, MAX_TEXT_CHARS)]


def reference_for(room: str, message_id: str) -> str:
    return f"{CHAT_REFERENCE_PREFIX}{room}:{message_id}"


def parse_reference(reference: object) -> tuple[str, str] | None:
    """``(room, message id)`` of a reply's reference, or None if it is not the chatbot's."""
    if not isinstance(reference, str) or not reference.startswith(CHAT_REFERENCE_PREFIX):
        return None
    room, sep, message_id = reference[len(CHAT_REFERENCE_PREFIX):].rpartition(":")
    return (room, message_id) if sep and room and message_id else None


# --- the bot ----------------------------------------------------------------------


class ChatBot:
    """The chatbot of one room, acting through the herder."""

    def __init__(self, settings: AgentSettings, herder: Herder, r: redis.Redis) -> None:
        self.settings = settings
        self.herder = herder
        self.r = r
        self.world = World(r)
        self.room = settings.agent_chat_room
        self.nick = settings.agent_chat_nick
        self._finish = r.register_script(_FINISH)
        self._compare_and_delete = r.register_script(_COMPARE_AND_DELETE)

    def _keys(self) -> tuple[str, str, str]:
        return CHAT_INFLIGHT_PREFIX + self.room, CHAT_ANSWERED_PREFIX + self.room, ROOM_PREFIX + self.room

    def answered(self) -> str | None:
        raw = self.r.get(CHAT_ANSWERED_PREFIX + self.room)
        return raw.decode() if isinstance(raw, bytes) else raw

    def in_flight(self) -> str | None:
        raw = self.r.get(CHAT_INFLIGHT_PREFIX + self.room)
        return raw.decode() if isinstance(raw, bytes) else raw

    def poll(self) -> str | None:
        """Look at the room once; ask for a reply if someone else spoke. Returns the job id asked for."""
        self.r.incr(CHAT_POLLS_PREFIX + self.room)
        history = self.world.history(self.room, self.settings.agent_chat_history_n)
        message = to_answer(history, self.nick, self.answered())
        if message is None:
            return None
        reference = reference_for(self.room, message.id)
        inflight, _, _ = self._keys()
        # The key outlives a lost response only by the response timeout, then the bot speaks again.
        if not self.r.set(inflight, reference, nx=True, ex=int(self.settings.agent_response_timeout_s)):
            return None
        log.info("CHAT     %s said %r in %s: asking for a reply", message.nick, message.text[:60], self.room)
        try:
            # No stop string at the herder: a reply that opens with the terminate symbol
            # would come back empty. The bot cuts it itself, after trimming.
            handle = self.herder.run(
                messages=reply_messages(history, self.nick), tokens=self.settings.agent_chat_max_tokens,
                temperature=0.8, model=self.settings.agent_model,
                fee=self.settings.agent_fee,
                multiplier=None if self.settings.agent_fee is not None else self.settings.agent_multiplier,
                reference=reference, callback=(CHAT_RESPONSE_TASK, self.settings.agent_queue),
                deadline_s=self.settings.agent_deadline_s,
            )
        except LlamasError as exc:
            # Refused: this message gets no reply (retrying every poll would only repeat the refusal).
            self._settle(reference, message.id, "")
            log.warning("CHAT     no reply to %s: %s", message.id, refusal_reason(exc))
            return None
        except Exception:
            # No answer from the herder: free the slot so the next look asks again.
            self._release(reference)
            raise
        log.info("CHAT     job %s for a reply to %s", handle.id, message.id)
        return handle.id

    def on_response(self, response: dict[str, Any]) -> bool:
        """Post the reply a response carries, once; False for a duplicate or a stranger's response."""
        parsed = parse_reference(response.get("reference"))
        if parsed is None or parsed[0] != self.room:
            log.warning("CHAT     response %s is not for this bot; ignored", response.get("job_id"))
            return False
        reference = str(response["reference"])
        reply = cut(str(response.get("text") or ""), self.settings.agent_chat_terminate)
        if response.get("status") != "done":
            log.warning("CHAT     job %s %s: %s", response.get("job_id"), response.get("status"),
                        response.get("message"))
            reply = ""
        if not self._settle(reference, parsed[1], reply):
            log.info("CHAT     duplicate response for %s ignored", reference)
            return False
        if reply:
            log.info("POST     %s: %s", self.nick, reply)
        else:
            log.info("CHAT     empty reply to %s; nothing posted", parsed[1])
        return True

    def _release(self, reference: str) -> None:
        self._compare_and_delete(keys=[self._keys()[0]], args=[reference])

    def _settle(self, reference: str, message_id: str, reply: str) -> bool:
        settled = self._finish(keys=list(self._keys()),
                               args=[reference, message_id, reply, self.nick, ROOM_MAXLEN])
        return bool(settled)

