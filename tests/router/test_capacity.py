"""Which workers count as slots: only those serving their model now."""

from __future__ import annotations

from router.core import dispatch


def test_only_serving_workers_count_and_a_beat_without_a_state_serves() -> None:
    herd = [
        {"worker": "a", "model": "m", "slots": 4, "state": "serving"},
        {"worker": "b", "model": "m", "slots": 2, "state": "draining"},
        {"worker": "c", "model": "m", "slots": 8, "state": "loading"},
        {"worker": "d", "model": None, "slots": 8, "state": "idle"},
        {"worker": "e", "model": "n", "slots": 3},  # a worker from before states: it serves
    ]
    assert dispatch.capacity(herd) == {"m": 4, "n": 3}
