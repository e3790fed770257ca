"""The World: chat rooms on Redis streams, with Broadcast and ChatHistory.

A room is the stream ``llamas:room:<room>``; each entry is one message with a
nickname. Stream ids order messages and name them (the chatbot remembers the
id of the last message it dealt with).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import redis

from agent.constants import ROOM_MAXLEN, ROOM_PREFIX
from agent.errors import BadMessage, BadReplayLine, BadRoom

#: Longest room name, nickname and message text, in characters.
MAX_ROOM_CHARS = 64
MAX_NICK_CHARS = 32
MAX_TEXT_CHARS = 2_000


@dataclass(frozen=True)
class ChatMessage:
    """One message of a room: its stream id, who said it, and what."""

    id: str
    nick: str
    text: str

    @property
    def at(self) -> float:
        """Unix seconds it was posted (from its stream id)."""
        return int(self.id.split("-", 1)[0]) / 1000


def check_room(room: str) -> str:
    if not (1 <= len(room) <= MAX_ROOM_CHARS and room.isprintable() and " " not in room):
        raise BadRoom(room, MAX_ROOM_CHARS)
    return room


def check_message(nick: str, text: str) -> None:
    if not (1 <= len(nick) <= MAX_NICK_CHARS and nick.isprintable() and nick.strip() == nick):
        raise BadMessage(f"nicknames are 1 to {MAX_NICK_CHARS} printable characters, got {nick!r}")
    if not text.strip():
        raise BadMessage("the text is empty")
    if len(text) > MAX_TEXT_CHARS:
        raise BadMessage(f"the text has {len(text)} characters, at most {MAX_TEXT_CHARS} fit")


def _decode(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


class World:
    """Chat rooms in one Redis: post to them and read their recent history."""

    def __init__(self, r: redis.Redis) -> None:
        self.r = r

    def broadcast(self, room: str, nick: str, text: str) -> ChatMessage:
        """Post ``text`` as ``nick`` to ``room`` (the original's Broadcast); returns the message."""
        check_room(room)
        check_message(nick, text)
        message_id = self.r.xadd(ROOM_PREFIX + room, {"nick": nick, "text": text},
                                 maxlen=ROOM_MAXLEN, approximate=True)
        return ChatMessage(_decode(message_id), nick, text)

    def history(self, room: str, n: int) -> list[ChatMessage]:
        """The last ``n`` messages of ``room``, oldest first (the original's ChatHistory)."""
        check_room(room)
        entries = cast("list[tuple[bytes, dict[bytes, bytes]]]",
                       self.r.xrevrange(ROOM_PREFIX + room, count=max(1, n)))
        return [
            ChatMessage(_decode(entry_id), _decode(fields.get(b"nick", b"?")), _decode(fields.get(b"text", b"")))
            for entry_id, fields in reversed(entries)
        ]

    def newest_id(self, room: str) -> str | None:
        found = self.history(room, 1)
        return found[0].id if found else None


# --- replay files ---------------------------------------------------------------


def parse_replay(path: Path, lines: Iterable[str]) -> Iterator[tuple[str, str]]:
    """``(nick, text)`` pairs of a replay file: JSON ``{"nick", "text"}`` or ``nick: text`` lines.

    Blank lines and lines starting with ``#`` are skipped.
    """
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("{"):
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise BadReplayLine(str(path), number, f"bad JSON: {exc.msg}") from None
            nick, text = doc.get("nick"), doc.get("text")
            if not isinstance(nick, str) or not isinstance(text, str):
                raise BadReplayLine(str(path), number, 'a JSON line needs string fields "nick" and "text"')
        else:
            nick, sep, text = line.partition(":")
            if not sep:
                raise BadReplayLine(str(path), number, 'expected "nick: text" or a JSON object')
            nick, text = nick.strip(), text.strip()
        try:
            check_message(nick, text)
        except BadMessage as exc:
            raise BadReplayLine(str(path), number, exc.reason) from None
        yield nick, text


def replay(world: World, room: str, messages: Iterable[tuple[str, str]], pace_s: float,
           sleep: Callable[[float], None] = time.sleep) -> Iterator[ChatMessage]:
    """Post ``messages`` to ``room`` one every ``pace_s`` seconds, yielding each as it is posted."""
    check_room(room)
    for i, (nick, text) in enumerate(messages):
        if i and pace_s > 0:
            sleep(pace_s)
        yield world.broadcast(room, nick, text)
