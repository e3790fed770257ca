"""Chat rooms on the real Redis: Broadcast, ChatHistory and replay files."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.errors import BadMessage, BadReplayLine, BadRoom
from agent.grading import sample_path
from agent.world import World, parse_replay, replay


def test_history_returns_the_last_messages_oldest_first(world: World, room: str):
    posted = [world.broadcast(room, nick, text) for nick, text in [("ana", "one"), ("ben", "two"), ("cleo", "three")]]
    history = world.history(room, 2)
    assert [(m.nick, m.text) for m in history] == [("ben", "two"), ("cleo", "three")]
    assert [m.id for m in history] == [p.id for p in posted[1:]]
    assert world.newest_id(room) == posted[-1].id and world.history(room + "-empty", 3) == []


def test_bad_rooms_and_messages_are_refused(world: World, room: str):
    with pytest.raises(BadRoom):
        world.broadcast("two words", "ana", "hi")
    with pytest.raises(BadMessage):
        world.broadcast(room, "ana", "   ")
    with pytest.raises(BadMessage):
        world.broadcast(room, "", "hi")
    assert world.history(room, 5) == []


def test_replay_reads_json_and_plain_lines_and_names_a_bad_line():
    lines = ['{"nick": "ana", "text": "hello"}', "", "# a comment", "ben: fine, thanks"]
    assert list(parse_replay(Path("f"), lines)) == [("ana", "hello"), ("ben", "fine, thanks")]
    with pytest.raises(BadReplayLine) as info:
        list(parse_replay(Path("f"), ["ana: hi", "no colon here"]))
    assert str(info.value) == 'f:2: expected "nick: text" or a JSON object'


def test_replay_posts_at_its_pace(world: World, room: str):
    pauses: list[float] = []
    posted = list(replay(world, room, [("ana", "a"), ("ben", "b"), ("cleo", "c")], 1.5, pauses.append))
    assert pauses == [1.5, 1.5] and [m.text for m in world.history(room, 10)] == ["a", "b", "c"]
    assert len(posted) == 3


def test_the_shipped_chat_sample_parses():
    path = Path(sample_path())
    messages = list(parse_replay(path, path.read_text().splitlines()))
    assert len(messages) >= 12
