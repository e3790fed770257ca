"""Labelled rooms: the shipped set and its split, and the ``--file`` format with its errors."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from agent import rooms
from agent.errors import BadRoomsFile


def test_the_shipped_set_is_large_balanced_and_split_in_disjoint_balanced_halves():
    every = rooms.shipped()
    assert len(every) >= 180 and len({r.room for r in every}) == len(every)
    assert Counter(r.label for r in every) == {label: len(every) // 3 for label in rooms.LABELS}
    tune, heldout = rooms.shipped(rooms.TUNE), rooms.shipped(rooms.HELDOUT)
    assert len(tune) + len(heldout) == len(every)
    assert {r.room for r in tune}.isdisjoint({r.room for r in heldout})
    # No chat appears in both halves under another name either.
    assert {r.messages for r in tune}.isdisjoint({r.messages for r in heldout})
    for half in (tune, heldout):
        assert Counter(r.label for r in half) == {label: len(every) // 6 for label in rooms.LABELS}
    # Short rooms are in both halves.
    assert all(any(len(r.messages) <= 2 for r in half) for half in (tune, heldout))


def test_a_users_file_needs_only_label_and_messages():
    lines = ['{"label": "positive", "messages": [{"nick": "ana", "text": "Great!"}]}', "",
             '{"room": "r2", "label": "neutral", "split": "tune", "messages": '
             '[{"nick": "ben", "text": "At six."}, {"nick": "cy", "text": "Ok."}]}']
    first, second = rooms.parse(lines, "mine.jsonl")
    assert (first.room, first.label, first.split, [m.text for m in first.messages]) == (
        "line-1", "positive", "", ["Great!"])
    assert (second.room, second.split, [m.nick for m in second.messages]) == ("r2", "tune", ["ben", "cy"])


@pytest.mark.parametrize("line, reason", [
    ("not json", "mine.jsonl:1: not JSON (Expecting value)"),
    ("[1, 2]", "mine.jsonl:1: expected a JSON object"),
    ('{"label": "happy", "messages": [{"nick": "a", "text": "b"}]}',
     "mine.jsonl:1: label must be one of positive, negative, neutral, got 'happy'"),
    ('{"label": "positive", "messages": []}',
     'mine.jsonl:1: messages must be a non-empty list of {"nick", "text"}'),
    ('{"label": "positive", "messages": [{"nick": "a"}]}',
     'mine.jsonl:1: message 1 must be {"nick": "...", "text": "..."} with non-empty strings'),
    ('{"label": "positive", "split": "train", "messages": [{"nick": "a", "text": "b"}]}',
     "mine.jsonl:1: split must be tune or heldout, got 'train'"),
])
def test_a_bad_line_is_refused_with_its_number_and_reason(line: str, reason: str):
    with pytest.raises(BadRoomsFile) as info:
        rooms.parse([line], "mine.jsonl")
    assert str(info.value) == reason


def test_a_repeated_room_and_an_empty_file_are_refused(tmp_path: Path):
    line = json.dumps({"room": "x", "label": "negative", "messages": [{"nick": "a", "text": "b"}]})
    with pytest.raises(BadRoomsFile, match=r"mine.jsonl:2: room 'x' appears twice"):
        rooms.parse([line, line], "mine.jsonl")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(BadRoomsFile, match="no rooms"):
        rooms.load_file(empty)
