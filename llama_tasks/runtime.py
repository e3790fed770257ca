"""What a worker process holds and how it runs one signed envelope.

``start_process`` fills the per-process context (the model in a batch
engine, the herder's public key, the operator's signing key, a Redis client)
once per model it serves (``unload`` frees it for the next);
``run_envelope`` is the whole life of a task, as a plain function that tests
can call without Celery.
Celery's task threads call it concurrently: the engine decodes their jobs
together.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from llama_cpp import Llama

from llama_tasks import claims, embedding, engine, faults, generation, registry, results, signing
from llama_tasks.batching import BatchEngine
from llama_tasks.constants import CANCEL_PREFIX
from llama_tasks.errors import (
    AlreadyAnswered,
    EngineFailed,
    Expired,
    LeaseEnding,
    LlamasError,
    Replayed,
    WrongModel,
)
from llama_tasks.job import Job, validate
from llama_tasks.placement import Placement
from llama_tasks.registry import ModelSpec
from llama_tasks.settings import WorkerSettings
from llama_tasks.stream import StreamWriter, TokenPipe

#: The least generation time worth starting an attempt for; with less left before its lease, the
#: herder sends the job again instead of paying for a prompt that cannot be answered in time.
MIN_GENERATION_S = 1.0
#: Most room a generation leaves before its lease ends, for its answer to reach the herder.
LEASE_ROOM_S = 5.0

log = logging.getLogger(__name__)


@dataclass
class ProcessContext:
    """Everything one worker process loads once and reuses for every task."""

    settings: WorkerSettings
    spec: ModelSpec
    vocab: Llama  # tokenizer, chat template and grammar parsing (no weights)
    engine: BatchEngine  # the weights, one context, ``slots`` sequences
    placement: Placement
    public_key: Ed25519PublicKey
    redis: redis.Redis
    loads: int
    load_s: float
    #: Signs each result, claim and heartbeat for whoever runs this worker: an operator, or the house.
    signer: signing.OperatorSigner
    #: Sends the engine's token events to their streams, off its thread.
    tokens: TokenPipe

    def describe(self) -> str:
        """One log line: what this process loaded and how it runs it."""
        return (
            f"pid {os.getpid()} loaded {self.spec.name} in {self.load_s:.2f}s: gpu={self.placement.gpu} "
            f"threads={self.placement.n_threads} slots={self.engine.slots} context={self.engine.n_ctx_per_slot} per slot"
        )


_context: ProcessContext | None = None
#: Times this process has loaded a model; a correct worker reports 1.
_load_count = 0


def check_startup(settings: WorkerSettings, serve: bool = True) -> ModelSpec | None:
    """Verify what a worker needs before it starts: the model file (when it starts with one,
    ``serve``), the herder's key and its operator's."""
    spec = None
    if serve:
        spec = registry.lookup(settings.models_file, settings.model)
        registry.verify(spec)
    signing.load_public(settings.public_key, settings.public_key_file)
    signing.load_operator(settings.operator, settings.signer_key_path)
    return spec


def start_process(settings: WorkerSettings, placement: Placement, slots: int,
                  on_stall: Callable[[], None] | None = None, spec: ModelSpec | None = None) -> ProcessContext:
    """Load ``spec`` (default: the configured model) into this process as ``placement`` says, with ``slots`` sequences.

    ``on_stall`` is called when the engine's watchdog gives up on it (every
    job it held has been answered by then). A worker serves one model at a
    time: it calls ``unload`` before loading another (``llama_tasks.switching``).
    """
    global _context, _load_count
    spec = spec or registry.lookup(settings.models_file, settings.model)
    if placement.cuda_visible_devices is not None:
        # Must be set before the CUDA runtime initialises inside the load.
        os.environ["CUDA_VISIBLE_DEVICES"] = placement.cuda_visible_devices
    started = time.perf_counter()
    batch = BatchEngine.load(
        spec.path, slots=slots, n_ctx_per_slot=settings.n_ctx,
        n_threads=placement.n_threads, n_gpu_layers=placement.n_gpu_layers,
        sample_limit_s=settings.sample_limit_s, on_stall=on_stall, draft_tokens=settings.draft_tokens,
        backend_greedy=settings.backend_sampling,
    ).start()
    _load_count += 1
    r = redis.Redis.from_url(settings.redis_url)
    tokens = TokenPipe(r).start()
    # The step's tokens go out while the next step decodes (llama.cpp leaves the interpreter free then):
    # sent between two decodes instead, every step would wait a round trip to Redis, which on another
    # host is a millisecond or more.
    batch.after_step = tokens.send_now
    _context = ProcessContext(
        settings=settings,
        spec=spec,
        vocab=engine.load_vocab(spec),
        engine=batch,
        placement=placement,
        public_key=signing.load_public(settings.public_key, settings.public_key_file),
        redis=r,
        loads=_load_count,
        load_s=time.perf_counter() - started,
        signer=signing.load_operator(settings.operator, settings.signer_key_path),
        tokens=tokens,
    )
    return _context


def unload(reason: str = "the engine stopped") -> None:
    """Stop this process's engine and free its model; jobs still in it fail with ``reason`` (retryably)."""
    global _context
    ctx, _context = _context, None
    if ctx is None:
        return
    ctx.engine.stop(reason)
    ctx.tokens.close()
    if not ctx.engine.stalled:
        # The weights now, not whenever the collector gets to them: the next model needs the memory.
        ctx.engine.model.close()
    ctx.redis.close()


def loaded() -> ProcessContext | None:
    """This process's context, or None while it serves no model (idle, or between two)."""
    return _context


def context() -> ProcessContext:
    if _context is None:
        raise EngineFailed("this process serves no model now (it is idle, or changing models)")
    return _context


def run_envelope(ctx: ProcessContext, envelope: Any, message_id: str, hostname: str) -> dict[str, Any]:
    """Verify, claim and generate one envelope; return the result document.

    Raises a ``Rejected`` error (nothing generated) or an ``InvalidRequest``
    error (the job cannot be generated); neither should be retried.
    """
    received_at = time.time()
    worker = ctx.settings.worker_name(hostname)
    payload = signing.verify(envelope, ctx.public_key)
    job = Job.from_payload(payload)
    if job.model != ctx.spec.name:
        raise WrongModel(job.model, ctx.spec.name)
    if job.expires_at < received_at:
        raise Expired(job.job_id, job.expires_at, received_at)
    limit_s = time_limit(ctx.settings, job, received_at)
    if limit_s is None:
        raise LeaseEnding(job.job_id, job.expires_at, received_at)
    # The claim names this process, which also beats: if it dies, the herder
    # knows this attempt died with it.
    try:
        claims.claim(ctx.redis, job.job_id, job.attempt, message_id, ctx.settings.claim_ttl_s, worker,
                     os.getpid(), sign=ctx.signer.sign_claim)
    except AlreadyAnswered:
        # This message, redelivered after its worker answered and died before the
        # ack: the same answer again (the herder settles an attempt once).
        kept = results.stored(ctx.redis, ctx.signer.name, job.job_id, job.attempt)
        if kept is None:
            raise Replayed(job.job_id, job.attempt) from None
        return kept
    faults.point("started")
    stream = StreamWriter(ctx.redis, job.job_id, job.attempt, ctx.settings.stream_ttl_s, ctx.tokens)
    stream.start(worker, os.getpid())
    cancel_key = CANCEL_PREFIX + job.job_id
    finish = functools.partial(claims.finish, ctx.redis, job.job_id, job.attempt, message_id, worker, os.getpid(),
                               sign=ctx.signer.sign_claim)
    try:
        validate(job, ctx.settings.max_tokens_cap)
        generated: generation.JobResult | embedding.Embedded
        if job.is_embedding:
            generated = embedding.run(ctx.engine, ctx.vocab, job)
        else:
            specs = generation.sequences(ctx.vocab, job, _first_token_point(stream),
                                         limit_s, ctx.settings.shared_prefixes)
            generated = generation.run(ctx.engine, specs, lambda: bool(ctx.redis.exists(cancel_key)))
    except LlamasError as exc:
        stream.error(type(exc).__name__, str(exc))
        finish()
        raise
    faults.point("generated")
    stream.end(generated.finish_reason)
    answer = generated.result(
        task_id=message_id, job_id=job.job_id, attempt=job.attempt, model=ctx.spec.name,
        model_id=ctx.spec.model_id, worker=worker, load_count=ctx.loads,
        queue_wait_s=max(0.0, received_at - job.issued_at),
    ).to_json()
    # Signed once, here: the stream entry and the task's stored result are this same document.
    answer = ctx.signer.attest_result(answer, job.attempt_secret)
    # Published before the claim is marked finished: a worker that dies in
    # between leaves the claim running, and the redelivered message generates
    # again (the herder settles whichever result comes first); one that dies
    # after leaves the answer kept for the redelivery to return.
    results.publish(ctx.redis, answer, ctx.signer.name, 2 * ctx.settings.visibility_timeout_s)
    faults.point("published")
    finish()
    faults.point("finished")
    return answer


def time_limit(settings: WorkerSettings, job: Job, now: float) -> float | None:
    """How long ``job`` may generate from ``now``: the soft limit, or less when its lease ends sooner.

    The envelope expires when the herder's lease does. A message that reaches
    this worker late (held up by a broker outage, handed back by Redis) would
    otherwise run to the soft limit past the lease: the herder sends the job
    again meanwhile and the answer arrives for an attempt that is no longer
    running. So it stops early enough to leave the room its answer needs
    (``LEASE_ROOM_S``, or the room the soft limit leaves before the hard one
    when that is less). None: no time left at all (the lease is up, or
    nearly: the herder sends it again).
    """
    room = min(LEASE_ROOM_S, settings.time_limit_s - settings.soft_time_limit_s)
    left = job.expires_at - now - room
    if left < MIN_GENERATION_S:
        return None
    return min(float(settings.soft_time_limit_s), left)


def _first_token_point(stream: StreamWriter) -> generation.OnChoiceText:
    """What writes each choice's text to ``stream``, with the ``first_token`` crash point after its first call."""
    crash = os.environ.get(faults.CRASH_AT_ENV) == "first_token"

    def streamed(index: int, text: str, logprobs: list[dict[str, Any]] | None) -> None:
        stream.token(text, index, logprobs)
        if crash:
            stream.flush()  # the point is "a token is in the stream", not "a token is queued"
            faults.point("first_token")

    return streamed
