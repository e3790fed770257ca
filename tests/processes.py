"""Real Celery worker processes for tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


class CeleryProcess:
    """A real ``celery -A <app> worker`` in a subprocess."""

    def __init__(self, app: str, queue: str, name: str, concurrency: int, env: dict[str, str],
                 log: Path, extra: list[str] | None = None, cwd: Path = ROOT) -> None:
        self.name = f"{name}@test"
        #: What it goes by in heartbeats, claims and results (an operator's worker: ``<operator>/<hostname>``).
        self.worker = f"{env['LLAMAS_OPERATOR']}/{self.name}" if env.get("LLAMAS_OPERATOR") else self.name
        self.log = log
        cmd = [
            sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue,
            "-c", str(concurrency), "-n", self.name, "-l", "info",
            "--without-mingle", "--without-gossip", *(extra or []),
        ]
        self._log_file = open(log, "wb")
        self.proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=self._log_file, stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def wait_ready(self, r: Any, timeout_s: float = 60.0) -> dict[str, Any]:
        """Wait for the worker's heartbeat (inference workers only)."""
        import json

        from llama_tasks.constants import HERD_PREFIX

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            doc = r.get(HERD_PREFIX + self.worker)
            if doc:
                return json.loads(doc)
            self._check_alive()
            time.sleep(0.1)
        raise TimeoutError(f"worker {self.name} sent no heartbeat:\n{self.output()}")

    def wait_log(self, text: str, timeout_s: float = 60.0) -> None:
        """Wait until ``text`` appears in the worker's log (e.g. 'ready.')."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if text in self.output():
                return
            self._check_alive()
            time.sleep(0.1)
        raise TimeoutError(f"{self.name}: {text!r} not logged:\n{self.output()}")

    def _check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.output()}")

    def output(self) -> str:
        self._log_file.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log_file.close()


def llama_worker(name: str, concurrency: int, env: dict[str, str], log: Path,
                 pool: str | None = None) -> CeleryProcess:
    """An inference worker: its default thread pool (``concurrency`` slots), or ``pool``."""
    queue = "llama." + env.get("LLAMAS_MODEL", "smollm2")
    return CeleryProcess("llama_tasks", queue, name, concurrency, env, log, ["-P", pool] if pool else None)


def poll(condition: Callable[[], Any], timeout_s: float, every_s: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy (its value), or None after the deadline.

    The one polling loop of the tests: for conditions no event announces
    (a process exiting, a server answering, a row changing state in another
    process's ledger).
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value or time.monotonic() >= deadline:
            return value or None
        time.sleep(every_s)


def wait_for(condition: Callable[[], Any], timeout_s: float = 60.0, what: str = "condition",
             on_timeout: Callable[[], str] = lambda: "", every_s: float = 0.05) -> Any:
    """``poll``, failing the test with ``what`` if the condition never holds."""
    value = poll(condition, timeout_s, every_s)
    if value is None:
        pytest.fail(f"timed out after {timeout_s}s waiting for {what}\n{on_timeout()}")
    return value


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of a process from /proc, or None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may hold spaces: fields start after the last ')'.
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1])


def alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has already died: only its exit status is left)."""
    stat = _stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def _parents() -> dict[int, int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None and stat[0] not in ("Z", "X"):
            parents[int(entry.name)] = stat[1]
    return parents


def children(pid: int) -> list[int]:
    """Live processes whose parent is ``pid``."""
    return [p for p, parent in _parents().items() if parent == pid]


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (pool children, an embedded beat and theirs)."""
    parents = _parents()
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        below = [p for p, pp in parents.items() if pp == parent]
        found += below
        frontier += below
    return found
