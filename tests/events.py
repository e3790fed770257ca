"""Celery events as Flower sees them, captured for tests, and waited for as they arrive."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any


class EventLog:
    """Events received so far; waiting is woken by each arrival, not by polling."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._arrived = threading.Condition()

    def add(self, event: dict[str, Any]) -> None:
        with self._arrived:
            self.events.append(event)
            self._arrived.notify_all()

    def wait(self, condition: Callable[[list[dict[str, Any]]], bool], what: str, timeout_s: float = 30.0) -> None:
        """Block until ``condition(events)`` holds; fail naming ``what`` after ``timeout_s``."""
        with self._arrived:
            assert self._arrived.wait_for(lambda: condition(self.events), timeout_s), f"no {what} in {timeout_s}s"

    def wait_for_tasks(self, wanted: set[tuple[str, str]], timeout_s: float = 30.0) -> None:
        """Block until an event of each ``(type, task id)`` in ``wanted`` has arrived."""
        self.wait(lambda events: wanted <= {(e.get("type", ""), e.get("uuid", "")) for e in events},
                  f"events {sorted(wanted)}", timeout_s)

    def named(self, task: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("name") == task]


@contextmanager
def captured_events(app: Any, timeout_s: float = 30.0) -> Iterator[EventLog]:
    """Every Celery event on the app's broker from now until the block ends."""
    log = EventLog()
    with app.connection_for_read() as listen, app.connection_for_write() as speak:
        receiver = app.events.Receiver(listen, handlers={"*": log.add})
        thread = threading.Thread(target=receiver.capture, kwargs={"wakeup": False}, daemon=True)
        thread.start()
        # Listening once an event sent after the start comes back; the receiver
        # may not be bound yet when the first probe goes out, so probe again
        # each time the wait for its echo runs out.
        probe = app.events.Dispatcher(speak, enabled=True)
        for _ in range(int(timeout_s / 0.5)):
            probe.send("test-probe")
            with log._arrived:
                if log._arrived.wait_for(lambda: any(e.get("type") == "test-probe" for e in log.events), 0.5):
                    break
        else:
            raise AssertionError("the event receiver never started")
        try:
            yield log
        finally:
            receiver.should_stop = True
            thread.join(timeout=10)


def text_forms(text: str) -> list[str]:
    """``text`` as it would appear in a log line or event: raw, repr-escaped, JSON-escaped."""
    return [text, repr(text)[1:-1], json.dumps(text)[1:-1]]
