"""What a worker process holds and how it runs one signed envelope.

``start_process`` fills the per-process context once (the model, the herder's
public key, a Redis client); ``run_envelope`` is the whole life of a task,
as a plain function that tests can call without Celery.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from llama_cpp import Llama

from llama_tasks import claims, engine, registry, signing
from llama_tasks.errors import Expired, LlamasError, WrongModel
from llama_tasks.job import Job, validate
from llama_tasks.placement import Placement, place
from llama_tasks.registry import ModelSpec
from llama_tasks.settings import WorkerSettings, cpu_count
from llama_tasks.stream import StreamWriter

log = logging.getLogger(__name__)


@dataclass
class ProcessContext:
    """Everything one worker process loads once and reuses for every task."""

    settings: WorkerSettings
    spec: ModelSpec
    llm: Llama
    placement: Placement
    public_key: Ed25519PublicKey
    redis: redis.Redis
    loads: int
    child_index: int


_context: ProcessContext | None = None
#: Times this process has loaded a model; a correct worker reports 1.
_load_count = 0


def check_startup(settings: WorkerSettings) -> ModelSpec:
    """Verify what a worker needs before it forks: the model file and the key."""
    spec = registry.lookup(settings.models_file, settings.model)
    registry.verify(spec)
    signing.load_public(settings.public_key, settings.public_key_file)
    return spec


def start_process(settings: WorkerSettings, child_index: int, concurrency: int) -> ProcessContext:
    """Load the model into this process, pinned by ``child_index`` of ``concurrency``."""
    global _context, _load_count
    spec = registry.lookup(settings.models_file, settings.model)
    placement = place(child_index, settings.gpu_ids, concurrency, cpu_count())
    if placement.cuda_visible_devices is not None:
        # Must be set before the CUDA runtime initialises inside the load.
        os.environ["CUDA_VISIBLE_DEVICES"] = placement.cuda_visible_devices
    started = time.perf_counter()
    llm = engine.load(spec, placement, settings.n_ctx)
    _load_count += 1
    log.info(
        "child %d (pid %d) loaded %s in %.2fs: gpu=%s threads=%d",
        child_index, os.getpid(), spec.name, time.perf_counter() - started,
        placement.gpu, placement.n_threads,
    )
    _context = ProcessContext(
        settings=settings,
        spec=spec,
        llm=llm,
        placement=placement,
        public_key=signing.load_public(settings.public_key, settings.public_key_file),
        redis=redis.Redis.from_url(settings.redis_url),
        loads=_load_count,
        child_index=child_index,
    )
    return _context


def context() -> ProcessContext:
    if _context is None:
        raise RuntimeError("this process has not loaded a model (worker_process_init did not run)")
    return _context


def run_envelope(ctx: ProcessContext, envelope: Any, message_id: str, worker: str) -> dict[str, Any]:
    """Verify, claim and generate one envelope; return the result document.

    Raises a ``Rejected`` error (nothing generated) or an ``InvalidRequest``
    error (the job cannot be generated); neither should be retried.
    """
    received_at = time.time()
    payload = signing.verify(envelope, ctx.public_key)
    job = Job.from_payload(payload)
    if job.model != ctx.spec.name:
        raise WrongModel(job.model, ctx.spec.name)
    if job.expires_at < received_at:
        raise Expired(job.job_id, job.expires_at, received_at)
    claims.claim(ctx.redis, job.job_id, job.attempt, message_id, ctx.settings.claim_ttl_s)
    stream = StreamWriter(ctx.redis, job.job_id, job.attempt, ctx.settings.stream_ttl_s)
    stream.start(worker, os.getpid())
    try:
        validate(job, ctx.settings.max_tokens_cap)
        tokens = engine.prompt_tokens(ctx.llm, job)
        engine.check_fits(len(tokens), job.max_tokens, ctx.llm.n_ctx())
        gbnf = engine.grammar_text(job)
        grammar = engine.compile_grammar(ctx.llm, gbnf) if gbnf else None
        _, template_stops = engine.render(ctx.llm, job)
        result = engine.generate(
            ctx.llm, job, tokens, job.stop + template_stops, grammar, stream.token
        )
    except LlamasError as exc:
        stream.error(type(exc).__name__, str(exc))
        claims.finish(ctx.redis, job.job_id, job.attempt, message_id)
        raise
    stream.end(result.finish_reason)
    claims.finish(ctx.redis, job.job_id, job.attempt, message_id)
    return {
        "task_id": message_id,
        "job_id": job.job_id,
        "attempt": job.attempt,
        "model": ctx.spec.name,
        "model_id": ctx.spec.model_id,
        "text": result.text,
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "finish_reason": result.finish_reason,
        "worker": worker,
        "pid": os.getpid(),
        "load_count": ctx.loads,
        "timings": {
            "queue_wait_s": max(0.0, received_at - job.issued_at),
            "prompt_s": result.prompt_s,
            "generation_s": result.generation_s,
            "tokens_per_s": result.tokens_per_s,
        },
    }
