"""Which model a running worker serves, and changing it when the herder says so (Init).

A worker is ``idle`` (no model: started with ``--no-model``), ``loading``,
``serving`` or ``draining``. An Init (``llama_tasks.control``) for another
model goes, in order:

1. **checked** before anything changes: the name is in this worker's
   registry with the id the Init names, its file is there, its bytes hash to
   that id, and it fits the memory this worker declares. A refusal leaves the
   worker serving what it had, and its heartbeat says why;
2. **draining**: the worker stops taking its old model's queue and lets the
   jobs it holds finish; past the Init's grace period it stops its engine,
   and what still runs fails retryably (``EngineFailed``): the herder runs
   each again elsewhere, and settles each once;
3. **loading**: the old model is freed and the new one loaded, once (the load
   count in results says so). A load that fails loads the old model again;
4. **serving**: the worker takes the new model's queue.

Each step is in the worker's heartbeat at once (state and since when, and the
Init's outcome), so whoever asked can follow it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from llama_tasks import control, registry
from llama_tasks.control import ACCEPTED, DRAINING, IDLE, LOADED, LOADING, REFUSED, SERVING, Init
from llama_tasks.errors import BadSignature, ConfigError, ModelIdMismatch, ModelTooLarge, Rejected, UnknownSigner, Unsigned
from llama_tasks.registry import ModelSpec
from llama_tasks.settings import WorkerSettings, queue_for

log = logging.getLogger(__name__)

#: Least time between saying "draining" and handing jobs back: a herder that sees a handed-back job
#: must already see this worker draining (its view of the herd is at most a quarter second old), or it
#: would send the job straight back to this model's queue, which no one may be taking any more.
HANDBACK_SETTLE_S = 1.0
#: How often a draining worker looks at what still runs.
DRAIN_POLL_S = 0.05
#: After its engine stopped, how long a worker waits for its task threads to report the jobs handed back.
HANDBACK_WAIT_S = 10.0
#: What a job handed back fails with (retryable: it runs again elsewhere).
HANDED_BACK = "handed back: this worker is changing models"
#: How long the control thread blocks on its list before looking at whether it should stop.
RECEIVE_TIMEOUT_S = 1.0
_MB = 1 << 20


class Host(Protocol):
    """What a switch needs from the worker process around it (Celery's consumer and the runtime)."""

    def consume(self, queue: str) -> None: ...

    def stop_consuming(self, queue: str) -> None: ...

    def running(self) -> int:
        """Jobs whose task has not returned yet."""
        ...

    def load(self, spec: ModelSpec) -> None: ...

    def unload(self, reason: str) -> None: ...

    def beat(self) -> None:
        """Publish a heartbeat now."""
        ...


def memory_mb(settings: WorkerSettings) -> int | None:
    """What this worker declares it can hold: the setting, else the machine's RAM on the CPU; None: no limit."""
    if settings.memory_mb:
        return settings.memory_mb
    if settings.gpu_ids:
        return None
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // _MB
    except (ValueError, OSError):
        return None


def loadable(models_file: Path) -> list[dict[str, Any]]:
    """The registry's models whose files this host has, with their sizes (the hash is checked at Init)."""
    found = []
    for spec in registry.load_registry(models_file).values():
        try:
            size = Path(spec.path).stat().st_size
        except OSError:
            continue
        found.append({"model": spec.name, "model_id": spec.model_id, "mb": -(-size // _MB)})
    return sorted(found, key=lambda m: m["model"])


def check(settings: WorkerSettings, init: Init, memory: int | None) -> ModelSpec:
    """The registry entry an Init asks for, verified; raises a ``ConfigError`` saying why not."""
    spec = registry.lookup(settings.models_file, init.model)
    if spec.model_id != init.model_id:
        raise ModelIdMismatch(init.model, init.model_id, spec.model_id)
    registry.verify(spec)
    needed = -(-Path(spec.path).stat().st_size // _MB)
    if memory is not None and needed > memory:
        raise ModelTooLarge(spec.name, needed, memory)
    return spec


class Switcher:
    """A worker's model over its life; ``run`` is its control thread."""

    def __init__(self, settings: WorkerSettings, host: Host, r: redis.Redis, public_key: Ed25519PublicKey,
                 worker: str, started_at: float, clock: Callable[[], float] = time.time) -> None:
        self.settings, self.host, self.redis, self.public_key = settings, host, r, public_key
        self.worker, self.started_at, self.clock = worker, started_at, clock
        self.spec: ModelSpec | None = None
        self.state, self.since = IDLE, clock()
        self.memory = memory_mb(settings)
        self.can_load = loadable(settings.models_file)
        #: The latest Init's outcome (``control.outcome``), for the heartbeat.
        self.last: dict[str, Any] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what the heartbeat says -------------------------------------------------

    def describe(self) -> dict[str, Any]:
        spec = self.spec
        return {
            "model": spec.name if spec else None,
            "model_id": spec.model_id if spec else None,
            "queue": queue_for(spec.name) if spec and self.state == SERVING else None,
            "state": self.state,
            "since": self.since,
            "can_load": self.can_load,
            "memory_mb": self.memory,
            "init": self.last,
        }

    def _enter(self, state: str) -> None:
        self.state, self.since = state, self.clock()
        self.host.beat()

    def _report(self, init: Init, outcome: str, reason: str) -> None:
        self.last = control.outcome(init.nonce, init.model, outcome, reason, self.clock())
        (log.warning if outcome == REFUSED else log.info)("Init %s (%s): %s%s", init.nonce, init.model, outcome,
                                                          f": {reason}" if reason else "")
        self.host.beat()

    # --- the life cycle ---------------------------------------------------------------

    def serving(self, spec: ModelSpec | None) -> None:
        """Say what the process started with (None: no model, idle)."""
        self.spec = spec
        self.state, self.since = (SERVING if spec else IDLE), self.clock()

    def start(self) -> Switcher:
        self._thread = threading.Thread(target=self.run, name="llamas-control", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=RECEIVE_TIMEOUT_S + 1)

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                message = control.receive(self.redis, self.worker, RECEIVE_TIMEOUT_S)
            except redis.RedisError as exc:  # the broker may come back; keep listening
                log.warning("reading Inits failed: %s", exc)
                self._stop.wait(RECEIVE_TIMEOUT_S)
                continue
            if message is not None:
                self.handle(message)

    def handle(self, message: Any) -> None:
        """Verify one message from this worker's list and carry it out."""
        try:
            init = control.accept(self.redis, message, self.public_key, self.worker, self.clock(), self.started_at)
        except (Unsigned, BadSignature, UnknownSigner) as exc:
            # Not from the herder: nobody to answer, nothing believed (not even its nonce).
            log.warning("control message refused: %s", exc)
            return
        except Rejected as exc:
            # Signed by the herder, but stale, replayed or for another worker.
            payload = message["payload"]
            log.warning("Init refused: %s", exc)
            self.last = control.outcome(str(payload.get("nonce")), str(payload.get("model")), REFUSED, str(exc),
                                        self.clock())
            self.host.beat()
            return
        self.apply(init)

    def apply(self, init: Init) -> None:
        """Change to the Init's model as the module says."""
        try:
            spec = check(self.settings, init, self.memory)
        except ConfigError as exc:
            self._report(init, REFUSED, str(exc))
            return
        if self.spec == spec and self.state == SERVING:
            self._report(init, LOADED, "already serving it")
            return
        self._report(init, ACCEPTED, "")
        old = self.spec
        if old is not None:
            self.host.stop_consuming(queue_for(old.name))
            self._enter(DRAINING)
            self._drain(init.grace_s)
        self._enter(LOADING)
        self.host.unload(HANDED_BACK)
        self._wait_until(lambda: self.host.running() == 0, HANDBACK_WAIT_S)
        try:
            self.host.load(spec)
        except Exception as exc:  # llama.cpp refused it: back to what it had
            log.exception("loading %s failed", spec.name)
            self._report(init, REFUSED, f"loading {spec.name} failed: {type(exc).__name__}: {exc}")
            self._restore(old)
            return
        self.spec = spec
        self.host.consume(queue_for(spec.name))
        self.can_load = loadable(self.settings.models_file)
        self._enter(SERVING)
        self._report(init, LOADED, "")

    def _drain(self, grace_s: float) -> None:
        if self._wait_until(lambda: self.host.running() == 0, grace_s):
            return
        self._wait_until(lambda: False, max(0.0, HANDBACK_SETTLE_S - grace_s))
        log.warning("%d job(s) still running after %.0fs of grace: handing them back", self.host.running(), grace_s)

    def _wait_until(self, done: Callable[[], bool], timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while not done():
            if time.monotonic() >= deadline:
                return False
            time.sleep(DRAIN_POLL_S)
        return True

    def _restore(self, old: ModelSpec | None) -> None:
        self.spec = None
        if old is not None:
            try:
                self.host.load(old)
            except Exception:
                log.exception("loading %s again failed: this worker now serves no model", old.name)
            else:
                self.spec = old
                self.host.consume(queue_for(old.name))
        self._enter(SERVING if self.spec else IDLE)
