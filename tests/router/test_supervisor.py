"""``llamas up``'s supervisor: how soon a dead component is started again.

Real child processes that exit at once, and a clock the test moves: no waiting
for the pauses themselves.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from router.local.supervisor import (
    HEALTHY_RUN_S,
    RESTART_PAUSE_MAX_S,
    RESTART_PAUSE_S,
    Component,
    Supervisor,
    restart_pause_s,
)


class Clock:
    """A monotonic clock that moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def supervisor(clock: Clock) -> Iterator[Supervisor]:
    sup = Supervisor(report=lambda text: None, clock=clock)
    yield sup
    sup.stop_all()


def _dying(tmp_path: Path) -> Component:
    """A component whose every run exits at once with status 3."""
    return Component("herder", [sys.executable, "-c", "raise SystemExit(3)"], {}, tmp_path / "logs" / "herder.log")


def _pause_after_death(sup: Supervisor, c: Component, clock: Clock) -> float:
    """Let the current run end, have the supervisor see it, and return the pause it chose (seconds)."""
    assert c.proc is not None
    c.proc.wait(timeout=30)
    sup.check()
    assert c.next_start > 0.0, "the death was not noticed"
    return c.next_start - clock.now


def _restart(sup: Supervisor, c: Component, clock: Clock) -> None:
    """Move the clock to the end of the pause, proving the supervisor does not restart a moment sooner."""
    first, restarts = c.proc, c.restarts
    clock.now = c.next_start - 0.01
    sup.check()
    assert c.proc is first and c.restarts == restarts
    clock.now = c.next_start
    sup.check()
    assert c.proc is not first and c.restarts == restarts + 1


def test_a_crash_loop_backs_off_up_to_the_cap_and_no_further(tmp_path, supervisor, clock):
    c = supervisor.add(_dying(tmp_path))
    pauses = []
    for _ in range(7):
        pauses.append(_pause_after_death(supervisor, c, clock))
        log = c._log_file
        _restart(supervisor, c, clock)
        assert log.closed  # type: ignore[attr-defined]  # each restart closes the last run's log
    assert pauses == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0, 5.0]
    assert max(pauses) == RESTART_PAUSE_MAX_S <= 5.0


def test_a_component_that_ran_healthily_restarts_after_the_base_pause(tmp_path, supervisor, clock):
    c = supervisor.add(_dying(tmp_path))
    for _ in range(5):  # a bad start: it crash-looped up to the cap
        _pause_after_death(supervisor, c, clock)
        _restart(supervisor, c, clock)
    # This run lasted the healthy span before it died: its old crashes are forgiven.
    clock.now += HEALTHY_RUN_S
    assert _pause_after_death(supervisor, c, clock) == RESTART_PAUSE_S
    _restart(supervisor, c, clock)
    # And dying at once after that restart backs off again from the start.
    assert _pause_after_death(supervisor, c, clock) == 2 * RESTART_PAUSE_S


def test_a_run_just_short_of_healthy_keeps_its_back_off(tmp_path, supervisor, clock):
    c = supervisor.add(_dying(tmp_path))
    for _ in range(3):
        _pause_after_death(supervisor, c, clock)
        _restart(supervisor, c, clock)
    clock.now += HEALTHY_RUN_S - 1
    assert _pause_after_death(supervisor, c, clock) == RESTART_PAUSE_MAX_S


def test_the_pause_stays_bounded_after_any_number_of_crashes():
    assert restart_pause_s(0) == RESTART_PAUSE_S
    assert restart_pause_s(10_000) == RESTART_PAUSE_MAX_S
