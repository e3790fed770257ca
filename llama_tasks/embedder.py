"""Embeddings on the batch engine: a second context on the same weights, decoded between generation steps.

The generation context cannot also embed. Embeddings are switched on for a
whole context (``llama_set_embeddings``), so a decode of it gives either
logits or pooled vectors, never both: every embedding decode on it would be
a step with no generation in it, on sequence ids that the generation slots
already use, with a pooling type fixed when the context was made. So the
engine keeps a second, small context on the same ``llama_model`` (the
weights are shared, not loaded twice): embeddings on, the model's pooling,
one KV memory shared by up to ``EMBED_MAX_SEQS`` inputs (a causal mask by
sequence keeps each input to itself), cleared before every decode. It is
made on the first embedding job, so a worker never asked for one pays
nothing for it (for the bundled model: 61 MiB of resident memory with the
default 2,048-token slot context, 28 MiB with 512).

The engine's thread drives it: after each generation step it runs one
embedding decode of the inputs waiting, oldest first, from any number of
requests, up to ``EMBED_STEP_TOKENS`` tokens (an input longer than that goes
alone). So generation is never held up by more than one decode of at most
that size (or of one input of at most a slot's context), and inputs of many
requests share one decode.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp._internals import LlamaModel

from llama_tasks import embedding
from llama_tasks.errors import EngineFailed

log = logging.getLogger(__name__)

#: Tokens one embedding decode takes at most (an input longer than this is decoded alone): the most one
#: embedding step may hold up the generating sequences, like the generation's own prompt chunks.
EMBED_STEP_TOKENS = 512
#: Inputs one embedding decode takes at most (sequence ids of the embedding context).
EMBED_MAX_SEQS = 64


class EmbedTicket:
    """The inputs of one embedding job: wait for their vectors (unit norm, in input order)."""

    def __init__(self, n_inputs: int) -> None:
        self.submitted_at = time.perf_counter()
        self.started_at: float | None = None
        self.finished_at: float | None = None
        self._vectors: list[np.ndarray | None] = [None] * n_inputs
        self._remaining = n_inputs
        self._error: BaseException | None = None
        self._done = threading.Event()

    def done(self) -> bool:
        return self._done.is_set()

    def result(self, timeout: float | None = None) -> list[np.ndarray]:
        if not self._done.wait(timeout):
            raise TimeoutError("the embeddings are not ready")
        if self._error is not None:
            raise self._error
        return [v for v in self._vectors if v is not None]

    @property
    def queue_s(self) -> float:
        """Seconds from submission until the first input was decoded."""
        return (self.started_at or self.submitted_at) - self.submitted_at

    @property
    def embed_s(self) -> float:
        """Seconds from the first input's decode until the last vector was ready."""
        return (self.finished_at or self.submitted_at) - (self.started_at or self.submitted_at)

    def _started(self, now: float) -> None:
        if self.started_at is None:
            self.started_at = now

    def _fill(self, index: int, vector: np.ndarray) -> None:
        if self._done.is_set():
            return
        self._vectors[index] = vector
        self._remaining -= 1
        if self._remaining == 0:
            self.finished_at = time.perf_counter()
            self._done.set()

    def _fail(self, error: BaseException) -> None:
        if not self._done.is_set():
            self._error = error
            self._done.set()


@dataclass(frozen=True)
class _Input:
    ticket: EmbedTicket
    index: int
    tokens: list[int]


class Embedder:
    """The embedding context of one engine and the inputs waiting for it.

    ``submit`` may be called from any thread; ``step`` and ``close`` only from
    the engine's. Building it does no I/O: the context is made by the first ``step``.
    """

    def __init__(self, model: LlamaModel, n_ctx: int, n_threads: int) -> None:
        self.model, self.n_ctx, self.n_threads = model, n_ctx, n_threads
        self._queue: deque[_Input] = deque()
        self._lock = threading.Lock()
        self._ctx: Any = None
        self._batch: Any = None
        self.n_embd = 0
        #: The pooling the context was made with (``llama_cpp.LLAMA_POOLING_TYPE_*``); set by the first step.
        self.pooling: int | None = None
        #: Decodes run, for tests and benchmarks: inputs of many jobs share one.
        self.decodes = 0

    def submit(self, inputs: list[list[int]]) -> EmbedTicket:
        """Queue ``inputs`` (each at most ``n_ctx`` tokens, none empty) as one ticket."""
        for tokens in inputs:
            if not tokens or len(tokens) > self.n_ctx:
                raise ValueError(f"an input must have 1 to {self.n_ctx} tokens, got {len(tokens)}")
        ticket = EmbedTicket(len(inputs))
        with self._lock:
            self._queue.extend(_Input(ticket, i, tokens) for i, tokens in enumerate(inputs))
        return ticket

    def pending(self) -> bool:
        return bool(self._queue)

    def declared_pooling(self) -> int:
        """The pooling type the model's GGUF declares (``none`` when it declares none)."""
        meta = self.model.metadata()
        value = meta.get(f"{meta.get('general.architecture', '')}.pooling_type")
        try:
            return int(value) if value is not None else llama_cpp.LLAMA_POOLING_TYPE_NONE
        except ValueError:
            return llama_cpp.LLAMA_POOLING_TYPE_NONE

    def _open(self) -> None:
        pooling = embedding.pooling_for(self.declared_pooling())
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.n_ctx
        # One micro-batch per decode: llama.cpp pools a sequence within one micro-batch only.
        params.n_batch = params.n_ubatch = self.n_ctx
        params.n_seq_max = EMBED_MAX_SEQS
        params.kv_unified = True
        params.embeddings = True
        params.pooling_type = pooling
        params.n_threads = params.n_threads_batch = self.n_threads
        params.no_perf = True
        ctx = llama_cpp.llama_init_from_model(self.model.model, params)
        if not ctx:
            raise EngineFailed("llama.cpp could not create the embedding context")
        self._ctx, self.pooling = ctx, pooling
        self._batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
        self.n_embd = int(llama_cpp.llama_model_n_embd_out(self.model.model))
        declared = self.declared_pooling()
        log.info("embedding context made: %d dimensions, %s pooling (the model declares %s), %d tokens a decode",
                 self.n_embd, embedding.POOLING_NAMES.get(pooling, str(pooling)),
                 embedding.POOLING_NAMES.get(declared, str(declared)), min(self.n_ctx, EMBED_STEP_TOKENS))

    def _take(self) -> list[_Input]:
        """The inputs of the next decode: the oldest waiting, as many as fit."""
        taken: list[_Input] = []
        with self._lock:
            # Never past the context, which a slot's context below EMBED_STEP_TOKENS makes the smaller.
            budget = min(self.n_ctx, max(EMBED_STEP_TOKENS, len(self._queue[0].tokens))) if self._queue else 0
            used = 0
            while self._queue and len(taken) < EMBED_MAX_SEQS and used + len(self._queue[0].tokens) <= budget:
                item = self._queue.popleft()
                taken.append(item)
                used += len(item.tokens)
        return taken

    def step(self) -> int:
        """Decode the inputs waiting (as many as fit one decode) and hand out their vectors; returns how many."""
        if not self._queue:
            return 0
        if self._ctx is None:
            try:
                self._open()
            except Exception as exc:
                self.fail_all(EngineFailed(f"embedding: {exc}"))
                raise
        taken = self._take()
        try:
            self._decode(taken)
        except Exception as exc:
            for item in taken:
                item.ticket._fail(exc if isinstance(exc, EngineFailed) else EngineFailed(f"embedding: {exc}"))
            raise
        return len(taken)

    def _decode(self, taken: list[_Input]) -> None:
        batch, n = self._batch, 0
        now = time.perf_counter()
        for seq, item in enumerate(taken):
            item.ticket._started(now)
            for pos, token in enumerate(item.tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, pos, 1
                # Every token an output: llama.cpp pools over the outputs (and would mark them all itself).
                batch.seq_id[n][0], batch.logits[n] = seq, True
                n += 1
        batch.n_tokens = n
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self._ctx), True)
        rc = llama_cpp.llama_decode(self._ctx, batch)
        if rc != 0:
            raise EngineFailed(f"llama_decode returned {rc} for embeddings")
        self.decodes += 1
        for seq, item in enumerate(taken):
            ptr = llama_cpp.llama_get_embeddings_seq(self._ctx, seq)
            if not ptr:
                raise EngineFailed("llama.cpp gave no pooled embedding")
            vector = np.ctypeslib.as_array(ptr, shape=(self.n_embd,)).copy()
            item.ticket._fill(item.index, embedding.normalized(vector))

    def fail_all(self, error: BaseException) -> None:
        """Answer every waiting input's ticket with ``error`` (the engine stopped or stalled)."""
        with self._lock:
            waiting, self._queue = list(self._queue), deque()
        for item in waiting:
            item.ticket._fail(error)

    def close(self) -> None:
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
