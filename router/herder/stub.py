"""A request's whole life in one process: the herder's own code with an
in-memory transport, like dramatiq's ``StubBroker`` + ``join()``.

``StubTransport`` is both transport and forwarder: dispatch puts envelopes
in its outbox, and ``join(service)`` runs each through a worker function —
``scripted_worker`` (answers at once, verifying the signature as a worker
does, and signing its result when run for an operator) or
``llama_tasks.runtime.run_envelope`` on a loaded model — and hands
the outcome to ``service.on_result`` / ``on_failure`` directly, until
nothing is left to run. Tests drain, then assert, with no processes and no
sleeps; the ledger is a real SQL database and Redis is real.
"""

from __future__ import annotations

import functools
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy.orm import Session, sessionmaker

from llama_tasks import engine, registry, scripted, signing
from llama_tasks.errors import Expired, WrongModel
from router.core import forwarding
from router.core.db import open_ledger
from router.core.models import JobRow
from router.core.parts import Clock, HerdSource, StoredResult, TokenCounting
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.herder.tokens import TokenCounter

#: ``worker(envelope, task_id) -> result document``; raising fails the attempt.
StubWorker = Callable[[dict[str, Any], str], dict[str, Any]]


def worker_name(model: str) -> str:
    """The name the stub worker of ``model`` beats and answers under."""
    return f"stub-{model}@local"


class StubTransport:
    """Transport and forwarder in memory; ``join`` runs what was sent.

    With ``handles`` (a Redis client), responses are also written where a
    waiting ``JobHandle`` or the HTTP gateway reads them.
    """

    def __init__(self, handles: redis.Redis | None = None, response_ttl_s: int = 3600) -> None:
        self.handles = handles
        self.response_ttl_s = response_ttl_s
        self.outbox: deque[tuple[str, dict[str, Any]]] = deque()
        self.stored: dict[str, StoredResult] = {}
        #: Every envelope sent, in order: ``(job id, attempt, envelope)``.
        self.sent: list[tuple[str, int, dict[str, Any]]] = []
        #: Final responses delivered to waiting handles, by job id.
        self.responses: dict[str, dict[str, Any]] = {}
        #: How many times each job's response reached its handle.
        self.handle_deliveries: Counter[str] = Counter()
        self.callbacks: list[tuple[str, str, dict[str, Any]]] = []
        self.webhooks: list[str] = []

    # --- Transport ---------------------------------------------------------------

    def send(self, row: JobRow, envelope: dict[str, Any]) -> None:
        assert row.task_id is not None
        self.outbox.append((row.task_id, envelope))
        self.sent.append((row.id, row.attempt, envelope))

    def stored_results(self, task_ids: Iterable[str]) -> dict[str, StoredResult]:
        return {t: self.stored[t] for t in task_ids if t in self.stored}

    # --- Forwarder ---------------------------------------------------------------

    def to_handle(self, response: dict[str, Any], times: tuple[float, float | None, float | None]) -> None:
        job_id = response["job_id"]
        # Delivered again only after its deliverer "died" (``llama_tasks.faults``): the same response.
        if job_id in self.responses and self.responses[job_id] != response:
            raise AssertionError(f"job {job_id} delivered to its handle twice, with different responses")
        self.responses[job_id] = response
        self.handle_deliveries[job_id] += 1
        if self.handles is not None:
            forwarding.to_handle(self.handles, response, self.response_ttl_s)

    def to_callback(self, task: str, queue: str, response: dict[str, Any]) -> None:
        self.callbacks.append((task, queue, response))

    def to_webhook(self, job_id: str) -> None:
        self.webhooks.append(job_id)

    # --- running -------------------------------------------------------------------

    def run_one(self, service: HerderService, worker: StubWorker, *, settle: bool = True) -> str:
        """Run the oldest sent envelope; returns its task id.

        With ``settle=False`` the outcome is only stored, as if the callback
        message were lost: the service's tick then finds it in the store.
        """
        task_id, envelope = self.outbox.popleft()
        try:
            doc = worker(envelope, task_id)
        except Exception as exc:  # a worker's failure, whatever it is, is the attempt's outcome
            self.stored[task_id] = StoredResult("failed", error=exc)
            if settle:
                service.on_failure(task_id, exc)
        else:
            self.stored[task_id] = StoredResult("done", document=doc)
            if settle:
                service.on_result(task_id, doc)
        return task_id

    def join(self, service: HerderService, worker: StubWorker, limit: int = 100_000) -> int:
        """Run envelopes until none are left (each settlement may dispatch more); returns how many ran."""
        ran = 0
        while self.outbox:
            if ran >= limit:
                raise RuntimeError(f"join: still running after {limit} envelopes")
            self.run_one(service, worker)
            ran += 1
        return ran


#: The house's key in every in-process herder that is not given one: its workers sign with it.
HOUSE = signing.OperatorSigner("", Ed25519PrivateKey.generate())


@functools.cache
def _vocab(path: str) -> Any:
    return engine.load_vocab(registry.ModelSpec(name="", path=path, sha256=""))


def generated_tokens(spec: registry.ModelSpec, text: str) -> int:
    """How many tokens the scripted worker says it generated for ``text``: its tokenizer's count."""
    return engine.count_completion(_vocab(spec.path), text)


def scripted_worker(public_key: Ed25519PublicKey, models: dict[str, registry.ModelSpec],
                    text: str = scripted.SCRIPTED_TEXT, *, operator: signing.OperatorSigner | None = None,
                    worker: str | None = None,
                    report: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> StubWorker:
    """A worker that checks envelopes as a real one does (signature, model, expiry) and answers ``text``.

    Its results are signed as a real worker's are: for ``operator``, as a
    worker started with ``LLAMAS_OPERATOR`` does, else for the house
    (``HOUSE``). It answers as host ``worker``, by default as the model's
    worker in ``StaticHerd`` (an operator's: ``<operator>/<that name>``).
    ``report`` changes each document before it is signed (what the worker
    says it took from its prompt cache, say).
    """
    signer = operator or HOUSE

    def run(envelope: dict[str, Any], task_id: str) -> dict[str, Any]:
        payload = signing.verify(envelope, public_key)
        spec = models.get(payload["model"])
        if spec is None:
            raise WrongModel(payload["model"], ",".join(sorted(models)))
        if payload["expires_at"] < time.time():
            raise Expired(payload["job_id"], payload["expires_at"], time.time())
        # ``worker`` is the hostname: an operator's worker goes by ``<operator>/<hostname>``, as a real one does.
        name = worker or worker_name(spec.name)
        if operator is not None:
            name = f"{operator.name}/{name}"
        doc = scripted.answer(payload, task_id, name, spec.model_id, text, generated_tokens(spec, text))
        return signer.attest_result(report(doc) if report is not None else doc, payload.get("attempt_secret", ""))

    return run


def operator_signer(name: str) -> signing.OperatorSigner:
    """A fresh key pair for operator ``name``, as a worker run for it holds (register its public key)."""
    return signing.OperatorSigner(name, Ed25519PrivateKey.generate())


class StaticHerd:
    """A herd source of one live stub worker per model with ``slots`` slots each."""

    def __init__(self, models: Iterable[str], slots: int) -> None:
        self.workers = [{"worker": worker_name(m), "model": m, "slots": slots, "busy": 0, "pid": 0, "gpus": []}
                        for m in models]

    def __call__(self, fresh: bool = False) -> list[dict[str, Any]]:
        return [dict(w) for w in self.workers]



def build(settings: HerderSettings, *, transport: StubTransport | None = None,
          herd: HerdSource | None = None, slots: int = 4,
          key: Ed25519PrivateKey | None = None, counter: TokenCounting | None = None,
          sessions: sessionmaker[Session] | None = None, clock: Clock = time.time,
          house: Ed25519PublicKey | None = None) -> HerderService:
    """A herder on ``settings``' ledger (migrated here) and Redis, with a stub transport.

    By default every registered model is served by one stub worker of
    ``slots`` slots, the herder signs with a fresh key, and the house's
    workers with ``HOUSE``.
    """
    counter = counter or TokenCounter(settings.models_file, settings.grammar_step_budget_ms / 1000)
    read_sessions = sessions
    if sessions is None:
        sessions, read_sessions = open_ledger(settings.ledger_url, settings.sqlite_synchronous)
    transport = transport or StubTransport()
    return HerderService(
        settings,
        sessions=sessions,
        counter=counter,
        key=key or Ed25519PrivateKey.generate(),
        redis_client=redis.Redis.from_url(settings.redis_url),
        transport=transport,
        forwarder=transport,
        herd=herd or StaticHerd(counter.models(), slots),
        house_key=house or HOUSE.key.public_key(),
        clock=clock,
        read_sessions=read_sessions,
    )
