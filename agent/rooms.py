"""Labelled rooms: the set shipped with the package, and a user's own file in the same format.

One room per line, JSON::

    {"room": "neg-007", "label": "negative", "split": "tune",
     "messages": [{"nick": "ana", "text": "Shares fell 12%."}, {"nick": "ben", "text": "Ouch."}]}

``label`` is ``positive``, ``negative`` or ``neutral``; ``messages`` (oldest
first) has at least one ``{nick, text}``. ``room`` (a unique name) and
``split`` (``tune`` or ``heldout``) are optional in a user's file. Blank
lines are skipped. The shipped set is split half and half per label: methods
and prompts are chosen on ``tune`` only, and the figure reported is
``heldout``'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from agent.errors import BadRoomsFile
from agent.scoring import NEGATIVE, NEUTRAL, POSITIVE
from agent.world import ChatMessage

LABELS = (POSITIVE, NEGATIVE, NEUTRAL)
TUNE, HELDOUT = "tune", "heldout"
SPLITS = (TUNE, HELDOUT)
#: The labelled rooms shipped with the package.
SHIPPED_FILE = "data/rooms.jsonl"


@dataclass(frozen=True)
class LabelledRoom:
    """One labelled room: its messages, the sentiment a person gave it, and its split."""

    room: str
    label: str
    messages: tuple[ChatMessage, ...]
    split: str = ""


def parse(lines: Iterable[str], path: str) -> list[LabelledRoom]:
    """The rooms of a labelled-rooms file; ``BadRoomsFile`` names the first bad line and why."""
    rooms: list[LabelledRoom] = []
    names: set[str] = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        room = _room(line, number, path)
        if room.room in names:
            raise BadRoomsFile(path, number, f"room {room.room!r} appears twice")
        names.add(room.room)
        rooms.append(room)
    if not rooms:
        raise BadRoomsFile(path, 0, "no rooms (one JSON object a line)")
    return rooms


def _room(line: str, number: int, path: str) -> LabelledRoom:
    def bad(reason: str) -> BadRoomsFile:
        return BadRoomsFile(path, number, reason)

    try:
        doc = json.loads(line)
    except json.JSONDecodeError as exc:
        raise bad(f"not JSON ({exc.msg})") from None
    if not isinstance(doc, dict):
        raise bad("expected a JSON object")
    label = doc.get("label")
    if label not in LABELS:
        raise bad(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    split = doc.get("split", "")
    if split not in ("", *SPLITS):
        raise bad(f"split must be tune or heldout, got {split!r}")
    name = doc.get("room", f"line-{number}")
    if not isinstance(name, str) or not name.strip():
        raise bad("room must be a non-empty string")
    return LabelledRoom(name, label, _messages(doc.get("messages"), bad), split)


def _messages(raw: Any, bad: Any) -> tuple[ChatMessage, ...]:
    if not isinstance(raw, list) or not raw:
        raise bad('messages must be a non-empty list of {"nick", "text"}')
    messages = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or not all(isinstance(m.get(k), str) and m[k].strip() for k in ("nick", "text")):
            raise bad(f'message {i + 1} must be {{"nick": "...", "text": "..."}} with non-empty strings')
        messages.append(ChatMessage(f"{i + 1}-0", m["nick"], m["text"]))
    return tuple(messages)


def load_file(path: Path) -> list[LabelledRoom]:
    """The rooms of a user's file (``OSError`` if it cannot be read)."""
    return parse(path.read_text(encoding="utf-8").splitlines(), str(path))


def shipped(split: str | None = None) -> list[LabelledRoom]:
    """The labelled rooms shipped with the package; only one split's with ``split``."""
    text = resources.files("agent").joinpath(SHIPPED_FILE).read_text(encoding="utf-8")
    rooms = parse(text.splitlines(), SHIPPED_FILE)
    return [r for r in rooms if split is None or r.split == split]
