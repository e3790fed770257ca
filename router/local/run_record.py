"""The record of one ``llamas up``'s processes, and how to find and stop them.

``llamas up`` writes it while it runs; a second ``llamas up`` reads it to
refuse while the set still runs, and ``llamas down`` stops what is left of
a set whose ``llamas up`` died without clean-up.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from router.core import private_files

#: A process that does not exit this long after SIGTERM is killed.
STOP_GRACE_S = 30.0
#: Environment variable carrying a run's token into every process it starts:
#: children inherit it, so /proc finds a run's leftovers wherever they are.
RUN_TOKEN_ENV = "LLAMAS_UP_RUN"


@dataclass
class RunRecord:
    """The set of processes one ``llamas up`` runs, kept in a file while it runs.

    Enough to find the set again after ``llamas up`` died without clean-up:
    its own pid (with its start time, against a reused pid), each component's
    pid (which is also its process group), the ports, and the token that every
    process of the run inherits in its environment.
    """

    path: Path
    token: str
    pid: int
    pid_started: int | None
    started_at: float
    ports: dict[str, int]
    components: dict[str, int] = field(default_factory=dict)

    @classmethod
    def new(cls, path: Path, ports: dict[str, int]) -> RunRecord:
        pid = os.getpid()
        return cls(path, os.urandom(16).hex(), pid, _started(pid), time.time(), dict(ports))

    @classmethod
    def load(cls, path: Path) -> RunRecord | None:
        """The record in ``path``; None when there is none or it is unreadable (it then describes nothing)."""
        try:
            doc = json.loads(path.read_text())
            return cls(
                path=path, token=str(doc["token"]), pid=int(doc["pid"]),
                pid_started=None if doc.get("pid_started") is None else int(doc["pid_started"]),
                started_at=float(doc["started_at"]),
                ports={str(k): int(v) for k, v in doc["ports"].items()},
                components={str(k): int(v) for k, v in doc["components"].items()},
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return None

    def save(self) -> None:
        doc = asdict(self)
        doc.pop("path")
        private_files.private_dir(self.path.parent)
        partial_file = self.path.with_name(self.path.name + ".partial")
        # 0600: the token in it finds every process of the run.
        private_files.write_private(partial_file, (json.dumps(doc, indent=2) + "\n").encode())
        os.replace(partial_file, self.path)  # a reader never sees half a record

    def discard(self) -> None:
        """Remove the file if it still describes this run (a later run may own it)."""
        current = RunRecord.load(self.path)
        if current is not None and current.token == self.token:
            self.path.unlink(missing_ok=True)

    def up_alive(self) -> bool:
        """Whether the ``llamas up`` process itself still runs."""
        stat = _stat(self.pid)
        if stat is not None:
            return stat.state != "Z" and (self.pid_started is None or stat.started == self.pid_started)
        return not _HAS_PROC and _signalable(self.pid)

    def survivors(self) -> dict[int, str]:
        """Every process of this run still running, pid → command name."""
        found = {self.pid: _name(self.pid)} if self.up_alive() else {}
        if _HAS_PROC:
            found.update((pid, _name(pid)) for pid in _carrying(f"{RUN_TOKEN_ENV}={self.token}"))
        else:
            # No /proc to read environments from: a component's process group is
            # its own session, so the group answering means part of it runs.
            found.update((pid, name) for name, pid in self.components.items() if _signalable(-pid))
        return found

    def stop(self, grace_s: float = STOP_GRACE_S) -> dict[int, str]:
        """Stop what is left of this run and remove the record; returns what was found running.

        ``llamas up`` itself, when alive, stops its components as on Ctrl-C.
        Otherwise each surviving component leader (and any orphan) gets
        SIGTERM — Celery workers then stop their own children — and whatever
        still runs after ``grace_s`` gets SIGKILL.
        """
        found = self.survivors()
        if self.up_alive():
            _send(self.pid, signal.SIGTERM)
            _wait_until(lambda: not self.up_alive(), grace_s + 2 * STOP_GRACE_S)
        left = self.survivors()
        if left:
            for pid in self._leaders(left):
                _send(pid, signal.SIGTERM)
            if not _wait_until(lambda: not self.survivors(), grace_s):
                for pid in self.survivors():
                    _send(pid, signal.SIGKILL)
                    if not _HAS_PROC:
                        _send(-pid, signal.SIGKILL)
                _wait_until(lambda: not self.survivors(), 10.0)
        self.path.unlink(missing_ok=True)
        return found

    def _leaders(self, pids: Iterable[int]) -> list[int]:
        # A process whose parent is also a survivor is stopped by that parent
        # (a Celery pool child by its worker), not signalled from outside.
        alive = set(pids)
        leaders = []
        for pid in alive:
            stat = _stat(pid)
            if stat is None or stat.ppid not in alive:
                leaders.append(pid)
        return leaders


@dataclass(frozen=True)
class _Stat:
    state: str
    ppid: int
    started: int  # clock ticks after boot: with the pid, names one process


_HAS_PROC = Path("/proc/self/stat").exists()


def _stat(pid: int) -> _Stat | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses; fields resume after the last ')'.
    fields = text[text.rindex(")") + 2:].split()
    return _Stat(state=fields[0], ppid=int(fields[1]), started=int(fields[19]))


def _started(pid: int) -> int | None:
    stat = _stat(pid)
    return None if stat is None else stat.started


def _name(pid: int) -> str:
    """A short description of a process for messages: ``celery -A router``, ``uvicorn router.api:app``."""
    try:
        args = [a.decode(errors="replace") for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0") if a]
    except OSError:
        return "?"
    words = [os.path.basename(a) for a in args]
    if len(words) > 2 and words[1] == "-m":
        words = words[2:]
    elif words and words[0].startswith("python"):
        words = words[1:]
    text = " ".join(" ".join(words[:3]).split())  # one line, whatever the arguments hold
    return (text[:40] + "…" if len(text) > 41 else text) or "?"


def _carrying(marker: str) -> list[int]:
    """Live processes of this user whose environment holds ``marker`` (``NAME=value``)."""
    needle = b"\0" + marker.encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:  # another user's process, or gone meanwhile
            continue
        if needle in b"\0" + environ.rstrip(b"\0") + b"\0":
            stat = _stat(int(entry.name))
            if stat is not None and stat.state != "Z":
                found.append(int(entry.name))
    return found


def _signalable(pid: int) -> bool:
    """Whether a process (or, for a negative pid, a process group) exists."""
    try:
        if pid < 0:
            os.killpg(-pid, 0)
        else:
            os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _send(pid: int, sig: int) -> None:
    try:
        if pid < 0:
            os.killpg(-pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_until(done: Callable[[], bool], timeout_s: float, poll_s: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout_s
    while not done():
        if time.monotonic() >= deadline:
            return False
        time.sleep(poll_s)
    return True
