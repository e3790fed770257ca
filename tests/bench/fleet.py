"""Several herders sharing one queue, exactly one beat, and a herd of stub workers, on one ledger.

What ``python -m tests.bench.scale`` and ``tests/router/test_herders.py``
start: herders as ``celery -A router worker -Q herder`` *without* ``-B``
(each its own ``-n``), one standalone ``celery -A router beat`` that sends
every herder's ticks, and ``tests.bench.stub_worker`` workers (each its own
``-n`` and a small thread pool) that answer at once. ``Books`` lets the
chaos suite's audit (``tests.chaos.audit.Scenario``) read such a fleet's
ledger, so every run is audited by the same code as the chaos scenarios.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import redis as redis_lib
from sqlalchemy.orm import Session, sessionmaker

from llama_tasks.constants import HERD_PREFIX
from router.core.settings import HERDER_QUEUE
from tests.bench.compare import stop_celery
from tests.bench.peers import READY_TIMEOUT_S
from tests.chaos.audit import Scenario
from tests.chaos.harness import ChaosStack
from tests.processes import ROOT, CeleryProcess, alive, descendants, poll

STUB_APP = "tests.bench.stub_worker"
#: The queue the stub workers serve (the default model's).
STUB_QUEUE = "llama.smollm2"
#: What beat logs each time it sends the herders' tick (``router/celery.py``'s schedule entry).
TICK_SENT = "Sending due task llamas-tick"
#: Broker keys a previous stack on the same Redis database may have left: its queues and unacked messages.
STALE_KEYS = (STUB_QUEUE, HERDER_QUEUE, "unacked", "unacked_index")


class Beat(CeleryProcess):
    """``celery -A router beat``: the one scheduler of ticks beside herders started without ``-B``.

    A ``CeleryProcess`` (its log, ``wait_log`` and ``stop``) with beat's
    command line instead of a worker's.
    """

    def __init__(self, env: dict[str, str], log: Path, schedule: Path) -> None:
        self.name = "beat"
        self.log = log
        self.argv = [sys.executable, "-m", "celery", "-A", "router", "beat", "-s", str(schedule), "-l", "info"]
        self._log_file = open(log, "wb")  # noqa: SIM115 (open for the process's life; closed in stop)
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ticking(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Wait until beat has sent its first tick."""
        self.wait_log(TICK_SENT, timeout_s)


@dataclass
class Fleet:
    """Stub workers, herders and one beat on the Redis and ledger that ``env`` names.

    The workers outlive ``stop_control``: a benchmark keeps one herd while it
    starts herders and a beat afresh (on a fresh ledger) for each configuration.
    """

    env: dict[str, str]
    tmp: Path
    workers: list[CeleryProcess] = field(default_factory=list)
    herders: list[CeleryProcess] = field(default_factory=list)
    beat: Beat | None = None
    #: Process groups of herders killed with ``kill``: ended again on ``stop`` in case anything outlived them.
    killed: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.r = redis_lib.Redis.from_url(self.env["LLAMAS_REDIS_URL"])

    def clear_broker(self) -> None:
        """Forget queued and unacknowledged messages an earlier stack left on this Redis database."""
        self.r.delete(*STALE_KEYS)

    def start_workers(self, n: int, threads: int, log_level: str = "warning") -> None:
        """``n`` stub workers, ``stub<i>@test``, each a ``threads``-thread pool; returns once all beat."""
        first = len(self.workers)
        started = [
            CeleryProcess(STUB_APP, STUB_QUEUE, f"stub{i}", threads, self.env, self.tmp / f"stub{i}.log",
                          extra=["-P", "threads", "-l", log_level])
            for i in range(first, first + n)
        ]
        self.workers += started
        for worker in started:
            worker.wait_ready(self.r, READY_TIMEOUT_S)

    def start_control(self, herders: int, concurrency: int, env: dict[str, str] | None = None,
                      logs: Path | None = None, app: str = "router") -> None:
        """``herders`` herders (``herder<i>@test``, ``-c concurrency``, no ``-B``) and the one beat.

        ``env`` overrides the fleet's (a configuration's own ledger, say);
        ``logs`` is where their logs and beat's schedule go; ``app`` is the herders'
        Celery app (``tests.bench.db_latency``: the herder behind a slow database). Returns once
        every herder is ready and beat has sent a tick.
        """
        env = env or self.env
        logs = logs or self.tmp
        logs.mkdir(parents=True, exist_ok=True)
        self.herders = [
            CeleryProcess(app, HERDER_QUEUE, f"herder{i}", concurrency, env, logs / f"herder{i}.log")
            for i in range(herders)
        ]
        self.beat = Beat(env, logs / "beat.log", logs / "beat-schedule")
        for herder in self.herders:
            herder.wait_log("ready.", READY_TIMEOUT_S)
        self.beat.wait_ticking()

    def kill(self, herder: CeleryProcess) -> list[int]:
        """SIGKILL a herder's whole process group (main process and pool children) at once.

        Returns the pids that were in it; waits until none of them runs.
        """
        family = [herder.proc.pid, *descendants(herder.proc.pid)]
        self.killed.append(herder.proc.pid)  # started in a session of its own: its pid is its group's id
        os.killpg(herder.proc.pid, signal.SIGKILL)
        herder.proc.wait(timeout=10)
        herder.stop()  # closes its log; the process is already gone
        if not poll(lambda: not any(alive(p) for p in family), 10.0):
            raise RuntimeError(f"processes of the killed herder still run: {[p for p in family if alive(p)]}")
        return family

    def stop_control(self) -> None:
        """Stop the beat and every herder (the workers keep running)."""
        for process in [*([self.beat] if self.beat else []), *self.herders]:
            if process.proc.poll() is None:
                stop_celery(process)
            else:
                process.stop()
        self.beat, self.herders = None, []
        for group in self.killed:
            try:
                os.killpg(group, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.killed.clear()

    def stop(self) -> None:
        """Stop everything, and take the stub workers out of the herd at once."""
        self.stop_control()
        for worker in self.workers:
            stop_celery(worker)
        if self.workers:
            self.r.delete(*(HERD_PREFIX + w.name for w in self.workers))
        self.workers = []
        self.r.close()


class Books:
    """What ``tests.chaos.audit.Scenario`` reads of a stack, for a fleet: its ledger, Redis and logs.

    ``last_seq`` and ``open_jobs`` are ``ChaosStack``'s own; the logs are
    every ``*.log`` under ``tmp`` (the audit looks in them for prompts and
    completions).
    """

    last_seq = ChaosStack.last_seq
    open_jobs = ChaosStack.open_jobs

    def __init__(self, sessions: sessionmaker[Session], r: redis_lib.Redis, tmp: Path) -> None:
        self.sessions, self.r, self.tmp = sessions, r, tmp

    def logs(self) -> list[Path]:
        return sorted(self.tmp.rglob("*.log"))


def audit_window(sessions: sessionmaker[Session], r: redis_lib.Redis, tmp: Path, title: str) -> Scenario:
    """The chaos suite's audit window on a fleet's ledger: open it before the load, ``finish()`` after."""
    return Scenario(cast(Any, Books(sessions, r, tmp)), title)
