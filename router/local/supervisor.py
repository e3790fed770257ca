"""Start, watch and stop the service's processes for ``llamas up``.

Each component is a child process in its own session (so its process group
is its own, pool children and beat included). A component that dies is
reported and restarted: after ``RESTART_PAUSE_S`` if it had been running
healthily for ``HEALTHY_RUN_S``, else after a pause that doubles per crash
up to ``RESTART_PAUSE_MAX_S`` (so one that dies right after starting does
not spin, and a restarted herder still serves within seconds). Ctrl-C sends
every child SIGTERM — Celery workers finish or requeue their running jobs —
and waits for all of them, so nothing is left running.

A ``llamas up`` killed with SIGKILL runs none of that, so on Linux every
component also asks for SIGTERM when its parent dies (``PR_SET_PDEATHSIG``),
and the running set is written to a ``RunRecord`` that the next ``llamas
up`` checks and ``llamas down`` stops.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from llama_tasks import lifeline
from router.core import private_files
from router.local.run_record import RUN_TOKEN_ENV, STOP_GRACE_S, RunRecord

__all__ = ["RUN_TOKEN_ENV", "Component", "RunRecord", "Supervisor", "python_module"]

#: Pause before restarting a dead component (seconds), doubled per crash in a
#: row up to the cap. The cap bounds every restart: with the supervisor's
#: half-second poll, a dead component is started again within about 5.5 s
#: however often it died, so a herder killed over and over still serves
#: within seconds of each kill.
RESTART_PAUSE_S, RESTART_PAUSE_MAX_S = 1.0, 5.0

#: A component that ran this long (seconds) before dying was healthy: its
#: crash count starts again, so it comes back after ``RESTART_PAUSE_S``.
HEALTHY_RUN_S = 60.0


@dataclass
class Component:
    """One supervised process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    started_at: float = 0.0
    _log_file: object = field(default=None, repr=False)

    def start(self) -> None:
        # A restart opens the log again: close the last one's, or a component
        # crash-looping for hours would use up the supervisor's descriptors.
        self._close_log()
        private_files.private_dir(self.log.parent)
        # A log may quote what a component was given: for the service's user alone.
        log_file = os.fdopen(private_files.open_private_append(self.log), "ab")
        self._log_file = log_file
        # Set between fork and exec (it survives exec): the component gets
        # SIGTERM, and stops as on Ctrl-C, when this process dies, SIGKILL included.
        pdeathsig = partial(lifeline.die_with_parent, signal.SIGTERM, os.getpid()) if lifeline.prepare() else None
        self.proc = subprocess.Popen(
            self.argv, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True, preexec_fn=pdeathsig,
        )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_file is not None:
            self._log_file.close()  # type: ignore[attr-defined]
            self._log_file = None

    def tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except FileNotFoundError:
            return ""


class Supervisor:
    """Keeps a set of components running until stopped.

    ``clock`` (seconds, monotonic) times the restart pauses and how long a
    component ran; tests pass their own.
    """

    def __init__(
        self, report: Callable[[str], None] = print, record: RunRecord | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.components: list[Component] = []
        self._report = report
        self._stopping = False
        self.record = record
        self._clock = clock

    def add(self, component: Component) -> Component:
        self.components.append(component)
        self._start(component)
        return component

    def _start(self, component: Component) -> None:
        component.start()
        component.started_at = self._clock()
        self._remember(component)

    def _remember(self, component: Component) -> None:
        # Rewritten on every (re)start, so a SIGKILL leaves the current pids behind.
        if self.record is not None and component.proc is not None:
            self.record.components[component.name] = component.proc.pid
            self.record.save()

    def check(self) -> None:
        """Restart any component that died (after its back-off pause)."""
        now = self._clock()
        for c in self.components:
            if self._stopping or c.running or c.proc is None:
                continue
            if c.next_start == 0.0:
                # Seen dead now, so it ran at most this long: a long run was
                # healthy, and an old crash must not slow this restart down.
                if now - c.started_at >= HEALTHY_RUN_S:
                    c.restarts = 0
                pause = restart_pause_s(c.restarts)
                self._report(
                    f"{c.name} exited with status {c.proc.returncode}; restarting in {pause:.0f}s "
                    f"(log: {c.log})\n{c.tail()}"
                )
                c.next_start = now + pause
            elif now >= c.next_start:
                c.restarts += 1
                c.next_start = 0.0
                self._start(c)

    def run_forever(self, poll_s: float = 0.5) -> None:
        """Watch the components until SIGINT or SIGTERM, then stop them all."""
        signal.signal(signal.SIGTERM, _interrupt)
        # Explicitly: a process started from a background job inherits SIGINT
        # ignored, and Python then leaves it ignored, so Ctrl-C (or a test's
        # SIGINT) would do nothing.
        signal.signal(signal.SIGINT, _interrupt)
        try:
            while True:
                self.check()
                time.sleep(poll_s)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop_all()

    def stop_all(self) -> None:
        self._stopping = True
        for c in reversed(self.components):
            if c.running:
                self._report(f"stopping {c.name}")
            c.stop()


def restart_pause_s(crashes: int) -> float:
    """Seconds to wait before restarting a component after ``crashes`` quick crashes in a row."""
    # The exponent is bounded: 2**1100 seconds is too large a float, and a
    # component crash-looping for hours must not crash its supervisor.
    return min(RESTART_PAUSE_S * 2 ** min(crashes, 32), RESTART_PAUSE_MAX_S)


def _interrupt(signum: int, frame: object) -> None:
    # SIGTERM stops `llamas up` the same way as Ctrl-C.
    raise KeyboardInterrupt


def python_module(module: str, *args: str) -> list[str]:
    """argv that runs ``python -m module`` with this interpreter."""
    return [sys.executable, "-m", module, *args]
