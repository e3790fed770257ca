"""Continuous batching: one llama.cpp context decodes every active sequence per step.

A ``BatchEngine`` owns one context with ``slots`` sequences (each with its own
KV memory of ``n_ctx_per_slot`` tokens) and a thread that loops: admit waiting
sequences into free slots, put one token of every generating sequence and as
much waiting prompt as fits into one ``llama_batch``, decode it once, then
sample each sequence with its own sampler chain (penalties, grammar, top-k,
top-p, min-p, temperature and its own seeded RNG). A sequence joins at the
next step and frees its slot the step it finishes, is cancelled or runs out of
time. Callers (Celery's task threads) ``submit`` and wait on the ``Ticket``.

A free slot keeps what its last sequence left in its KV memory, and a new
sequence goes to the free slot where it saves the most: the prefix of its
prompt that slot holds, which is not computed again (the prompt cache), less
what of another prompt it would throw away, and next to the busy slots:
llama.cpp decodes each run of consecutive sequence ids as a micro-batch of
its own, so scattered sequences cost a pass over the weights each. A prefix
is reused only for the same ``cache_key`` (the herder gives each account its
own), except its public part (the chat template's own text, a prefix the
operator declares shared): a tenant's prompt never shortens, and so never
times or counts, another tenant's.

With ``draft_tokens`` > 0 the engine also decodes speculatively from the
prompt: after a sequence's next token it puts a draft, the tokens that
followed the latest earlier occurrence of its last few tokens
(``_PromptLookup``), into the same batch, then samples at each drafted position
in turn for as long as the sampler chooses the drafted token. The sampler makes
the same choices, one per token and in order, as without the draft, so the
answer is the same; where text repeats its prompt, several tokens come out of
one step. The rest of a draft leaves the sequence's memory.

A greedy sequence (temperature 0, nothing that changes the logits, no log
probabilities asked for) takes its token from llama.cpp's backend sampling:
its slot's sequence id carries a greedy sampler chain, the argmax runs inside
the decode's graph (on the GPU, where there is one) and only the token comes
back, so neither the vocabulary's logits of every sequence cross to the host
nor does Python scan them each step. A slot's chain is attached or detached
as sequences of the other kind take it (each change re-plans the graph once,
a few milliseconds), so a new sequence prefers a slot already of its kind.

Embedding jobs share the thread (``llama_tasks.embedder``): after each
generation step it runs one decode of the inputs waiting to be embedded, in a
second context on the same weights.

A watchdog thread ends what a step cannot: a sampler that spins inside
llama.cpp (a pathological grammar) is C code no Python thread can interrupt,
so past ``sample_limit_s`` (or a sequence's own time limit) the watchdog
answers every ticket itself — the stuck sequence with what it produced, the
others with a retryable ``EngineFailed`` — and calls ``on_stall``, which in a
worker ends the process (its supervisor starts a fresh one).

ctypes releases the GIL around every llama.cpp call, so the task threads,
heartbeats and Redis writes run while a step decodes.
"""

from __future__ import annotations

import codecs
import ctypes
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import llama_cpp
import numpy as np
from llama_cpp import LlamaGrammar
from llama_cpp import _logger as llama_logger
from llama_cpp._internals import LlamaModel, LlamaSampler

from llama_tasks.embedder import Embedder, EmbedTicket
from llama_tasks.engine import common_prefix
from llama_tasks.errors import EngineFailed
from llama_tasks.job import (
    DEFAULT_MIN_P,
    DEFAULT_REPEAT_PENALTY,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_K,
    DEFAULT_TOP_P,
    check_fits,
)
from llama_tasks.result import TIME_LIMIT

log = logging.getLogger(__name__)

#: Prompt tokens one step may decode (llama.cpp's n_batch): a long prompt is
#: fed in chunks so the sequences already generating are not stalled for it.
STEP_TOKENS = 512

#: What a new run of consecutive busy slots costs, counted in prompt tokens
#: decoded again. llama.cpp decodes each run of consecutive sequence ids as a
#: micro-batch of its own, a pass over every weight, at every step for the
#: sequence's life: two sequences in slots 4 and 7 took 16.6 ms a step
#: where eight in slots 0-7 took 36 ms and one 7.5 ms (SmolLM2-135M, 2 cores).
#: So a new sequence goes next to the busy ones unless a slot elsewhere
#: keeps a longer prompt cached than this.
RUN_TOKENS = 256
#: Prompt-lookup drafting: the longest and shortest run of a sequence's last tokens looked up
#: earlier in it (its prompt and what it generated); what followed there is the draft.
DRAFT_NGRAM_MAX, DRAFT_NGRAM_MIN = 3, 2
#: Generated tokens the repeat penalty looks back over (llama-cpp-python's default).
PENALTY_LAST_N = 64
#: Longest one sequence's sampling may take before the watchdog calls the engine stalled.
#: Sampling one token (full-vocabulary softmax, a JSON-schema grammar) takes milliseconds;
#: seconds mean a grammar whose parse stacks exploded.
SAMPLE_LIMIT_S = 5.0
#: How often the watchdog looks.
WATCHDOG_PERIOD_S = 0.25
#: How long one sample may run past its sequence's time limit before the watchdog calls it stuck:
#: far above any honest sample, which takes milliseconds (a step's decode may end past the limit).
PAST_LIMIT_S = 1.0


#: ``on_text(piece, logprobs)``: a final piece of text, and the log probability entries of the
#: tokens it completes (the pieces join up to the text, the entries to the result's ``logprobs``).
OnText = Callable[[str, list[dict[str, Any]] | None], None]


@dataclass(kw_only=True)
class SequenceSpec:
    """One sequence to generate: its prompt tokens and how to sample after them."""

    tokens: list[int]
    max_tokens: int
    stops: list[str] = field(default_factory=list)
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    repeat_penalty: float = DEFAULT_REPEAT_PENALTY
    seed: int = 0
    grammar: LlamaGrammar | None = None
    #: Patterns that switch ``grammar`` on once the generated text matches one (a lazy grammar:
    #: a tool call with tool_choice auto); empty: the grammar holds from the first token.
    grammar_triggers: list[str] = field(default_factory=list)
    #: None: no log probabilities; k >= 0: each token's, with its k best alternatives.
    top_logprobs: int | None = None
    #: Receives the text as it becomes final (never a piece of a stop string), with the log
    #: probabilities of the tokens whose text it completes (None unless ``top_logprobs`` is set).
    on_text: OnText | None = None
    #: Seconds the sequence may take from admission; past it, it ends with what it made ("time_limit").
    time_limit_s: float | None = None
    #: Whose prompt cache this sequence may reuse: only a slot last filled with the same key
    #: (None: one tenant, e.g. in-process use).
    cache_key: str | None = None
    #: Leading prompt tokens that are public by construction (template text, a declared shared
    #: prefix): these may be reused from any tenant's slot.
    public_tokens: int = 0


@dataclass
class SequenceResult:
    """What one sequence produced, with its timings."""

    text: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop", "length", "cancelled" or "time_limit"
    logprobs: list[dict[str, Any]] | None
    queue_s: float  # waiting for a free slot
    prompt_s: float  # from admission until the first token was sampled
    generation_s: float  # from the first token to the end
    drafted_tokens: int = 0  # tokens drafted from its own text and decoded to be checked
    accepted_tokens: int = 0  # of those, the ones its sampler chose: each saved a step

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.generation_s if self.generation_s > 0 else 0.0


class Ticket:
    """A submitted sequence: wait for its result, or cancel it."""

    def __init__(self, spec: SequenceSpec) -> None:
        self.spec = spec
        self.submitted_at = time.perf_counter()
        self._done = threading.Event()
        # The loop and the watchdog may both answer a ticket: the first answer stands.
        self._finishing = threading.Lock()
        self._result: SequenceResult | None = None
        self._error: BaseException | None = None
        self.cancelled = False

    def cancel(self) -> None:
        """Stop at the next step; the result keeps the text made so far."""
        self.cancelled = True

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Whether the sequence finished within ``timeout`` seconds."""
        return self._done.wait(timeout)

    def result(self, timeout: float | None = None) -> SequenceResult:
        if not self._done.wait(timeout):
            raise TimeoutError("the sequence has not finished")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def _finish(self, result: SequenceResult | None, error: BaseException | None = None) -> None:
        with self._finishing:
            if self._done.is_set():
                return  # answered already (by the watchdog, while the loop was stuck)
            self._result, self._error = result, error
            self._done.set()


def _takes_argmax(spec: SequenceSpec) -> bool:
    """Greedy with nothing that changes the logits (no grammar, no repeat penalty): its token is their argmax."""
    return spec.temperature == 0.0 and spec.grammar is None and spec.repeat_penalty == 1.0


def id_runs(ids: set[int]) -> int:
    """How many runs of consecutive numbers ``ids`` makes: {0, 1, 2, 5} makes two (llama.cpp's micro-batches
    of a step, with a KV stream per sequence)."""
    return sum(1 for i in ids if i - 1 not in ids)


def _earliest_stop(text: str, stops: list[str], start: int) -> int:
    """Index of the first stop string in ``text`` at or after ``start``, or -1."""
    # A plain loop: it runs for every token of every sequence, and comprehensions cost more than the finds.
    earliest = -1
    for stop in stops:
        i = text.find(stop, start)
        if i >= 0 and (earliest < 0 or i < earliest):
            earliest = i
    return earliest


class _Text:
    """The completion text of one sequence, released as it becomes final.

    Text is handed on only once it can no longer turn out to be the start of
    a stop string, so the pieces always join up to exactly the final text.
    A token's log probability entry goes with the piece that completes its
    text; what is left at the end (the token that held a stop string) goes
    with the last piece, which may be empty, so the entries join up to
    exactly the sequence's ``logprobs``.
    """

    def __init__(self, stops: list[str], on_text: OnText | None, logprobs: bool) -> None:
        self.stops, self.on_text = stops, on_text
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.hold_back = max((len(s) for s in stops), default=1) - 1
        self.text, self.emitted = "", 0
        # Entries not yet handed on, each with the text length its token's text ends at.
        self.entries: deque[tuple[int, dict[str, Any]]] | None = deque() if logprobs else None

    def add(self, piece: bytes, entry: dict[str, Any] | None = None) -> bool:
        """Append a token's bytes (and its logprob entry); True when a stop string ended the text."""
        self.text += self.decoder.decode(piece)
        if self.entries is not None and entry is not None:
            self.entries.append((len(self.text), entry))
        if not self.stops:  # the common case, every token of every sequence: nothing to look for
            if len(self.text) > self.emitted:
                self._emit(len(self.text))
            return False
        cut = _earliest_stop(self.text, self.stops, max(0, self.emitted - self.hold_back))
        if cut >= 0:
            self.text = self.text[:cut]
            return True
        safe = len(self.text) - self.hold_back
        if safe > self.emitted:
            self._emit(safe)
        return False

    def close(self, flush_bytes: bool) -> str:
        if flush_bytes:  # bytes of a character the token limit cut in half
            self.text += self.decoder.decode(b"", final=True)
        if len(self.text) > self.emitted or self.entries:
            self._emit(len(self.text), everything=True)
        return self.text

    def _emit(self, upto: int, everything: bool = False) -> None:
        piece, self.emitted = self.text[self.emitted:upto], upto
        entries: list[dict[str, Any]] | None = None
        if self.entries is not None:
            entries = []
            while self.entries and (everything or self.entries[0][0] <= upto):
                entries.append(self.entries.popleft()[1])
        if self.on_text is not None:
            self.on_text(piece, entries)


class _PromptLookup:
    """Drafts for prompt-lookup decoding (speculative decoding without a draft model).

    A sequence that copies from its prompt (extracting, rewriting, JSON with
    repeated keys) continues the way it went before: after its last ``n``
    tokens, propose what followed the latest earlier occurrence of those ``n``
    tokens. ``seen`` maps each ``n``-gram to the index of the token that
    followed it, kept up to date one token at a time (no scan per step).
    """

    def __init__(self, tokens: list[int]) -> None:
        self.tokens: list[int] = []
        self.seen: dict[tuple[int, ...], int] = {}
        for token in tokens:
            self.append(token)

    def append(self, token: int) -> None:
        # The n-grams ending at the current last token are indexed once it stops being the suffix.
        end = len(self.tokens)
        for n in range(DRAFT_NGRAM_MIN, DRAFT_NGRAM_MAX + 1):
            if end >= n:
                self.seen[tuple(self.tokens[end - n:end])] = end
        self.tokens.append(token)

    def draft(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that followed the latest earlier occurrence of the longest suffix found."""
        for n in range(DRAFT_NGRAM_MAX, DRAFT_NGRAM_MIN - 1, -1):
            if len(self.tokens) >= n:
                follows = self.seen.get(tuple(self.tokens[-n:]))
                if follows is not None:
                    return self.tokens[follows:follows + limit]
        return []


@dataclass
class _Slot:
    """One sequence id of the context and what its KV memory holds."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    last_used: float = 0.0
    active: _Active | None = None
    #: The cache key of the sequence that filled ``cached``, and how many of its tokens are public.
    owner: str | None = None
    public: int = 0
    #: The greedy sampler chain attached to this sequence id for backend sampling (None: none).
    greedy: Any = None

    def reusable(self, spec: SequenceSpec) -> int:
        """How much of ``spec``'s prompt this slot's memory may serve."""
        common = common_prefix(self.cached, spec.tokens)
        if self.owner == spec.cache_key:
            return common
        return min(common, self.public, spec.public_tokens)


class _Active:
    """A sequence running in a slot."""

    def __init__(self, ticket: Ticket, slot: _Slot, reused: int, sampler: LlamaSampler) -> None:
        self.ticket, self.slot, self.sampler = ticket, slot, sampler
        spec = ticket.spec
        self.pending = spec.tokens[reused:]  # prompt tokens still to decode
        self.cached_tokens = reused
        self.admitted_at = time.perf_counter()
        self.deadline = self.admitted_at + spec.time_limit_s if spec.time_limit_s else math.inf
        self.first_token_at: float | None = None
        self.text = _Text(spec.stops, spec.on_text, spec.top_logprobs is not None)
        self.completion = 0
        self.next_token: int | None = None  # sampled, not yet decoded
        self.batch_index = -1  # where this step's logits for it are
        self.output_row = -1  # and which of the step's output rows that is (llama.cpp keeps them in batch order)
        self.logprobs: list[dict[str, Any]] | None = [] if spec.top_logprobs is not None else None
        #: Its prompt and sampled tokens, indexed for drafting (None: this engine drafts nothing).
        self.lookup: _PromptLookup | None = None
        self.draft: list[int] = []  # decoded this step after ``next_token``, to be checked
        self.drafted = self.accepted = 0
        #: Greedy with nothing that changes the logits (no grammar, no repeat penalty): its token is
        #: the argmax of its logits, taken in the decode's graph (``backend``) or for every such
        #: sequence of a step at once.
        self.argmax = _takes_argmax(spec)
        #: Its slot's backend sampler picks its token: no logits of its reach the host.
        self.backend = False
        #: How many tokens its next draft may have: halved down to one by each rejected draft,
        #: doubled back by each accepted whole, so text that does not repeat costs little.
        self.draft_limit = 0


class BatchEngine:
    """Decodes up to ``slots`` sequences together from one context.

    Build it with ``BatchEngine.load`` (which loads the weights) or give it a
    loaded ``LlamaModel``; ``start()`` creates the context and the thread.
    """

    def __init__(self, model: LlamaModel, slots: int, n_ctx_per_slot: int, n_threads: int,
                 sample_limit_s: float = SAMPLE_LIMIT_S, on_stall: Callable[[], None] | None = None,
                 draft_tokens: int = 0, backend_greedy: bool = True) -> None:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        if draft_tokens < 0:
            raise ValueError(f"draft_tokens must be >= 0, got {draft_tokens}")
        #: Most tokens drafted per sequence and step (prompt lookup); 0: no speculative decoding.
        self.draft_tokens = draft_tokens
        #: Greedy sequences take their tokens from llama.cpp's backend sampling (False: from the logits, here).
        self.backend_greedy = backend_greedy
        #: Chains detached from a slot: the graph planned with them is re-planned at the next decode,
        #: and they are freed after it.
        self._retired: list[Any] = []
        #: Tokens drafted and accepted, over the engine's life.
        self.drafted = self.accepted = 0
        self.model, self.slots, self.n_ctx_per_slot, self.n_threads = model, slots, n_ctx_per_slot, n_threads
        self.sample_limit_s = sample_limit_s
        #: Called (from the watchdog) once the engine is stalled for good; every ticket is answered first.
        self.on_stall = on_stall
        #: The sequence being sampled now and since when (perf_counter); read by the watchdog.
        self._sampling: tuple[_Active, float] | None = None
        #: Set once the watchdog gave up on the loop: nothing more is admitted.
        self.stalled = False
        self._watchdog: threading.Thread | None = None
        self._slots = [_Slot(i) for i in range(slots)]
        self._waiting: deque[Ticket] = deque()
        self._lock = threading.Condition()
        self._ctx: Any = None
        self._memory: Any = None
        self._batch: Any = None
        #: The batch's arrays, each read off the struct once: every read of a ctypes struct's
        #: pointer field builds a new pointer object, and a step fills five per token.
        self._fields: tuple[Any, Any, Any, list[Any], Any] | None = None
        self._n_vocab = 0
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._stop_reason = "the engine stopped"
        self.steps = 0
        #: Seconds spent in generation steps, and in llama_decode within them: the rest is the
        #: engine's own work per step (admitting, sampling, detokenising, stop strings, streaming).
        self.step_s = self.decode_s = 0.0
        #: Called after each generation step, before the next decode (a worker sends the step's tokens then).
        self.after_step: Callable[[], None] | None = None
        #: This step's argmax of every output row's logits (None until a greedy sequence needs it), and the rows.
        self._argmax: list[int] | None = None
        self._outputs = 0
        #: Each token's text and whether it ends generation, read from the vocabulary once: a sequence
        #: asks for both every step, and each ask is a call into llama.cpp.
        self._pieces: dict[int, bytes] = {}
        self._eog: dict[int, bool] = {}
        #: Inputs of embedding jobs, decoded by this engine's thread between generation steps.
        self.embedder = Embedder(model, n_ctx_per_slot, n_threads)

    @classmethod
    def load(cls, path: str, *, slots: int, n_ctx_per_slot: int, n_threads: int, n_gpu_layers: int,
             sample_limit_s: float = SAMPLE_LIMIT_S, on_stall: Callable[[], None] | None = None,
             draft_tokens: int = 0, backend_greedy: bool = True) -> BatchEngine:
        # llama.cpp's own log (every layer, every buffer) only on errors.
        llama_logger.set_verbose(False)
        params = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        model = LlamaModel(path_model=path, params=params, verbose=False)
        return cls(model, slots, n_ctx_per_slot, n_threads, sample_limit_s=sample_limit_s, on_stall=on_stall,
                   draft_tokens=draft_tokens, backend_greedy=backend_greedy)

    # --- life cycle ----------------------------------------------------------

    def start(self) -> BatchEngine:
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.slots * self.n_ctx_per_slot
        params.n_seq_max = self.slots
        # Each sequence its own KV stream: attention of one job never spans
        # another's cells, and a slot holds exactly n_ctx_per_slot tokens.
        params.kv_unified = False
        params.n_batch = params.n_ubatch = STEP_TOKENS
        params.n_threads = params.n_threads_batch = self.n_threads
        params.no_perf = True
        # Flash attention on: the configuration every measurement and test of the engine ran with.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
        # A sequence's outputs in one step: its next token and its draft. Backend sampling sizes its buffers by it.
        params.n_outputs_max_per_seq = 1 + self.draft_tokens
        self._ctx = llama_cpp.llama_init_from_model(self.model.model, params)
        if not self._ctx:
            raise EngineFailed("llama.cpp could not create a context")
        self._memory = llama_cpp.llama_get_memory(self._ctx)
        self._batch = llama_cpp.llama_batch_init(STEP_TOKENS + self.slots, 0, 1)
        b = self._batch
        self._fields = (b.token, b.pos, b.n_seq_id, [b.seq_id[i] for i in range(STEP_TOKENS + self.slots)], b.logits)
        self._n_vocab = llama_cpp.llama_vocab_n_tokens(self.model.vocab)
        self._thread = threading.Thread(target=self._loop, name="llamas-batch", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(target=self._watch, name="llamas-watchdog", daemon=True)
        self._watchdog.start()
        return self

    def stop(self, reason: str = "the engine stopped") -> None:
        """Stop the loop and free the context; sequences still in it fail with ``reason`` (retryably)."""
        if self._thread is None and self._ctx is None:
            return  # never started, or stopped already
        with self._lock:
            self._stop_reason = reason
            self._stopping = True
            self._lock.notify_all()
        if self.stalled:
            return  # its thread is stuck inside llama.cpp: freeing the context under it would crash
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = self._fields = None
        self.embedder.close()
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None
        # After the context, which holds them while it lives.
        for slot in self._slots:
            if slot.greedy is not None:
                self._retired.append(slot.greedy)
                slot.greedy = None
        self._free_retired()

    # --- what callers see ----------------------------------------------------

    def submit(self, spec: SequenceSpec) -> Ticket:
        check_fits(len(spec.tokens), spec.max_tokens, self.n_ctx_per_slot)
        if not spec.tokens:
            raise ValueError("a sequence needs at least one prompt token")
        ticket = Ticket(spec)
        with self._lock:
            if self._stopping or self.stalled:
                raise EngineFailed("the engine is stopping")
            self._waiting.append(ticket)
            self._lock.notify_all()
        return ticket

    def embed(self, inputs: list[list[int]]) -> EmbedTicket:
        """Queue the token lists of one embedding job; the ticket gives their vectors (unit norm)."""
        for tokens in inputs:
            check_fits(len(tokens), 0, self.n_ctx_per_slot)
        with self._lock:
            if self._stopping or self.stalled:
                raise EngineFailed("the engine is stopping")
            ticket = self.embedder.submit(inputs)
            self._lock.notify_all()
        return ticket

    def busy(self) -> int:
        """Sequences in a slot now."""
        return sum(1 for s in self._slots if s.active is not None)

    def waiting(self) -> int:
        return len(self._waiting)

    def healthy(self) -> bool:
        """Whether the loop is making progress: what a worker's heartbeat vouches for."""
        sampling = self._sampling
        return not self.stalled and (sampling is None or time.perf_counter() - sampling[1] <= self.sample_limit_s)

    # --- the watchdog -----------------------------------------------------------

    def _watch(self) -> None:
        while not self._stopping and not self.stalled:
            time.sleep(WATCHDOG_PERIOD_S)
            sampling = self._sampling
            if sampling is None:
                continue
            seq, since = sampling
            now = time.perf_counter()
            # Only the sample itself counts: a decode may end past a sequence's limit, and the loop ends it then.
            if now - since > self.sample_limit_s or now - max(since, seq.deadline) > PAST_LIMIT_S:
                self._give_up(seq, now - since)

    def _give_up(self, stuck: _Active, for_s: float) -> None:
        """The loop is stuck sampling ``stuck``: answer every ticket here, then ``on_stall``.

        The stuck sequence ends as its time limit would end it, with what it
        produced (its requester pays for that, as for a cancel); the others did
        nothing wrong and fail retryably, to run again elsewhere.
        """
        log.error("the engine has been sampling one sequence for %.1fs (a pathological grammar?); "
                  "ending it and giving up on this engine", for_s)
        with self._lock:
            self.stalled = True
            waiting = list(self._waiting)
            self._waiting.clear()
        try:
            try:
                stuck.ticket._finish(self._partial(stuck, TIME_LIMIT))
            except Exception as exc:  # its last piece could not be streamed: it fails, still answered
                stuck.ticket._finish(None, exc)
            for slot in self._slots:
                seq = slot.active
                if seq is not None and seq is not stuck:
                    seq.ticket._finish(None, EngineFailed("the engine stalled on another job"))
            for ticket in waiting:
                ticket._finish(None, EngineFailed("the engine stalled on another job"))
            self.embedder.fail_all(EngineFailed("the engine stalled on another job"))
        finally:
            # Whatever went wrong above, the worker must not stay frozen.
            if self.on_stall is not None:
                self.on_stall()

    # --- the loop -------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._stopping and not self._waiting and not self.busy() and not self.embedder.pending():
                    self._lock.wait()
                if self._stopping or self.stalled:
                    break
                self._admit()
            started = time.perf_counter()
            try:
                self._step()
            except Exception as exc:  # a bug or llama.cpp refusing: fail what runs, keep serving
                log.exception("batch step failed")
                for slot in self._slots:
                    if slot.active is not None:
                        self._release(slot.active, None, EngineFailed(f"decoding failed: {exc}"))
                        self._forget(slot)
            self.step_s += time.perf_counter() - started
            if self.after_step is not None:
                self.after_step()
            try:
                # One embedding decode between two generation steps: neither waits longer than one of the other.
                self.embedder.step()
            except Exception:  # its inputs' tickets are answered; generation goes on
                log.exception("embedding step failed")
        for slot in self._slots:
            if slot.active is not None:
                self._release(slot.active, None, EngineFailed(self._stop_reason))
        for ticket in self._waiting:
            ticket._finish(None, EngineFailed(self._stop_reason))
        self._waiting.clear()
        self.embedder.fail_all(EngineFailed(self._stop_reason))

    def _admit(self) -> None:
        """Move waiting sequences into free slots, each where its prompt is cached longest."""
        while self._waiting:
            free = [s for s in self._slots if s.active is None]
            if not free:
                return
            ticket = self._waiting.popleft()
            if ticket.cancelled:
                ticket._finish(self._cancelled_before_start(ticket))
                continue
            spec = ticket.spec
            slot = self._slot_for(spec, free)
            # At least the last prompt token is decoded again: its logits are the first sample.
            reused = min(slot.reusable(spec), len(spec.tokens) - 1)
            if not llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, reused, -1):
                reused = 0
                llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            slot.cached = slot.cached[:reused]
            slot.owner, slot.public = spec.cache_key, spec.public_tokens
            slot.active = active = _Active(ticket, slot, reused, self._sampler(spec))
            active.backend = self._attach_greedy(slot, self._wants_backend(spec))
            if self.draft_tokens:
                slot.active.lookup = _PromptLookup(spec.tokens)
                slot.active.draft_limit = self.draft_tokens

    def _wants_backend(self, spec: SequenceSpec) -> bool:
        """Whether ``spec``'s tokens can come from a backend greedy sampler: greedy, and no logits wanted."""
        return self.backend_greedy and _takes_argmax(spec) and spec.top_logprobs is None

    def _attach_greedy(self, slot: _Slot, want: bool) -> bool:
        """Give ``slot``'s sequence id a backend greedy chain, or take it away; whether it has one.

        A chain is attached once in its life (llama.cpp initialises its
        backend part once), so each attach takes a new one.
        """
        if want and slot.greedy is None:
            chain = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
            llama_cpp.llama_sampler_chain_add(chain, llama_cpp.llama_sampler_init_greedy())
            if llama_cpp.llama_set_sampler(self._ctx, slot.seq_id, chain):
                slot.greedy = chain
            else:  # this backend cannot sample (e.g. a model split by tensor): argmax here, as before
                llama_cpp.llama_sampler_free(chain)
        elif not want and slot.greedy is not None:
            llama_cpp.llama_set_sampler(self._ctx, slot.seq_id, None)
            self._retired.append(slot.greedy)
            slot.greedy = None
        return slot.greedy is not None

    def _free_retired(self) -> None:
        for chain in self._retired:
            llama_cpp.llama_sampler_free(chain)
        self._retired.clear()

    def _slot_for(self, spec: SequenceSpec, free: list[_Slot]) -> _Slot:
        """The free slot where ``spec`` costs the least: the prompt its memory serves, less what of
        another prompt it would throw away, less ``RUN_TOKENS`` for each run of consecutive busy
        slots it would leave; then one whose backend sampler already suits it (no re-planned
        graph); among equals the one longest unused.

        Taking a slot for a few shared tokens (a chat template's opening) would
        throw away a whole prompt that its requester may send again (a long
        system prompt, tools, a conversation) to save a few: an empty or
        stale slot is the better place then.
        """
        greedy = self._wants_backend(spec)
        busy = {s.seq_id for s in self._slots if s.active is not None}

        def saved(slot: _Slot) -> tuple[int, bool, float]:
            served = slot.reusable(spec)
            runs = id_runs(busy | {slot.seq_id})
            return (served - (len(slot.cached) - served) - RUN_TOKENS * runs,
                    (slot.greedy is not None) == greedy, -slot.last_used)

        return max(free, key=saved)

    def _sampler(self, spec: SequenceSpec) -> LlamaSampler:
        """The chain llama-cpp-python's ``Llama.generate`` builds, so answers match it."""
        sampler = LlamaSampler()
        sampler.add_penalties(
            n_vocab=self._n_vocab, penalty_last_n=PENALTY_LAST_N, penalty_repeat=spec.repeat_penalty,
            penalty_freq=0.0, penalty_present=0.0,
        )
        if spec.grammar is not None and spec.grammar_triggers:
            sampler.add_grammar_lazy_patterns(self.model, spec.grammar, spec.grammar_triggers, [])
        elif spec.grammar is not None:
            sampler.add_grammar(self.model, spec.grammar)
        if spec.temperature == 0.0:
            sampler.add_greedy()
        else:
            sampler.add_top_k(spec.top_k)
            sampler.add_typical(1.0, 1)
            sampler.add_top_p(spec.top_p, 1)
            sampler.add_min_p(spec.min_p, 1)
            sampler.add_temp(spec.temperature)
            sampler.add_dist(spec.seed)
        return sampler

    def _step(self) -> None:
        active = [s.active for s in self._slots if s.active is not None]
        now = time.perf_counter()
        for seq in active:
            if seq.ticket.cancelled:
                self._end(seq, "cancelled")
            elif now > seq.deadline:
                self._end(seq, TIME_LIMIT)
        active = [seq for seq in active if seq.slot.active is seq]
        if not active:
            return
        batch, n = self._batch, 0
        assert self._fields is not None
        token_of, pos_of, n_seq_id_of, seq_id_of, logits_of = self._fields
        fed: list[tuple[_Active, list[int]]] = []

        outputs = 0

        def add(seq: _Active, token: int, pos: int, logits: bool) -> None:
            nonlocal n, outputs
            token_of[n], pos_of[n], n_seq_id_of[n] = token, pos, 1
            seq_id_of[n][0], logits_of[n] = seq.slot.seq_id, logits
            if logits:
                seq.batch_index, seq.output_row = n, outputs
                outputs += 1
            n += 1

        # Generating sequences first, one token each: a joining prompt never stalls them.
        generating = [seq for seq in active if seq.next_token is not None]
        spare = STEP_TOKENS - len(generating)
        for seq in generating:
            assert seq.next_token is not None
            fed.append((seq, [seq.next_token]))
            # Its draft after it, each with logits: what the sampler would choose there is checked below.
            seq.draft = self._draft(seq, len(seq.slot.cached), spare)
            spare -= len(seq.draft)
        budget = spare
        for seq in active:
            if seq.next_token is None and seq.pending and budget > 0:
                chunk, seq.pending = seq.pending[:budget], seq.pending[budget:]
                fed.append((seq, chunk))
                budget -= len(chunk)
        # Written in slot order: llama.cpp splits a step into micro-batches of
        # consecutive sequence ids (each its own KV stream), so any other order
        # costs micro-batches, each a pass over every weight.
        fed.sort(key=lambda item: item[0].slot.seq_id)
        for seq, tokens in fed:
            start = len(seq.slot.cached)
            if seq.next_token is not None:
                add(seq, tokens[0], start, True)
                for i, token in enumerate(seq.draft):
                    token_of[n], pos_of[n], n_seq_id_of[n] = token, start + 1 + i, 1
                    seq_id_of[n][0], logits_of[n] = seq.slot.seq_id, True
                    n += 1
                    outputs += 1
            else:
                for i, token in enumerate(tokens):
                    add(seq, token, start + i, not seq.pending and i == len(tokens) - 1)
        batch.n_tokens = n
        self._argmax, self._outputs = None, outputs
        decoding = time.perf_counter()
        rc = llama_cpp.llama_decode(self._ctx, batch)
        self.decode_s += time.perf_counter() - decoding
        if self._retired:
            self._free_retired()  # the graph that used them is gone: this decode planned a new one
        if rc != 0:
            raise EngineFailed(f"llama_decode returned {rc}")
        self.steps += 1
        for seq, tokens in fed:
            seq.slot.cached.extend(tokens)
            seq.next_token = None
            draft, seq.draft = seq.draft, []
            accepted = 0
            if not seq.pending and seq.batch_index >= 0 and seq.slot.active is seq:
                if not self._sample_guarded(seq):
                    return  # the watchdog answered every ticket meanwhile; nothing here is ours any more
                # Each drafted token the sampler chose itself is kept, and its logits give the next
                # sample: the same choices, one per token, as without the draft.
                while accepted < len(draft) and seq.slot.active is seq and seq.next_token == draft[accepted]:
                    seq.slot.cached.append(draft[accepted])
                    if seq.lookup is not None:
                        seq.lookup.append(draft[accepted])
                    seq.next_token = None
                    seq.batch_index += 1
                    seq.output_row += 1
                    accepted += 1
                    if not self._sample_guarded(seq):
                        return
                if draft:
                    whole = accepted == len(draft)
                    seq.draft_limit = min(self.draft_tokens, 2 * seq.draft_limit) if whole else max(1, seq.draft_limit // 2)
                seq.drafted += len(draft)
                seq.accepted += accepted
                self.drafted += len(draft)
                self.accepted += accepted
            if accepted < len(draft):
                # The rest of the draft is not the sequence's: out of its memory.
                llama_cpp.llama_memory_seq_rm(self._memory, seq.slot.seq_id, len(seq.slot.cached), -1)
            seq.batch_index = seq.output_row = -1

    def _sample_guarded(self, seq: _Active) -> bool:
        """Sample ``seq`` where its logits are, watched; False once the watchdog has taken over."""
        self._sampling = (seq, time.perf_counter())
        try:
            self._sample(seq)
        except Exception as exc:  # its stream's Redis went away: this job fails, the batch goes on
            if seq.slot.active is seq:
                self._release(seq, None, exc)
        finally:
            self._sampling = None
        return not self.stalled

    def _draft(self, seq: _Active, pos: int, spare: int) -> list[int]:
        """What to decode after ``seq``'s next token at ``pos`` to check it: at most ``spare`` tokens,
        none past its context or its max_tokens."""
        if seq.lookup is None:
            return []
        assert seq.next_token is not None
        seq.lookup.append(seq.next_token)
        room = min(seq.draft_limit, spare, self.n_ctx_per_slot - pos - 1,
                   seq.ticket.spec.max_tokens - seq.completion - 1)
        return seq.lookup.draft(room) if room > 0 else []

    def _sample(self, seq: _Active) -> None:
        spec = seq.ticket.spec
        if seq.backend:
            token = llama_cpp.llama_get_sampled_token_ith(self._ctx, seq.batch_index)
            if token < 0:
                raise EngineFailed("llama.cpp's backend sampler gave no token")
        elif seq.argmax:
            argmax = self._argmax if self._argmax is not None else self._greedy_rows()
            token = argmax[seq.output_row]
        else:
            # The sampler copies the logits it works on: the context's stay as decoded.
            token = llama_cpp.llama_sampler_sample(seq.sampler.sampler, self._ctx, seq.batch_index)
        if seq.first_token_at is None:
            seq.first_token_at = time.perf_counter()
        eog = self._eog.get(token)
        if eog is None:
            eog = self._eog[token] = bool(llama_cpp.llama_vocab_is_eog(self.model.vocab, token))
        if eog:
            self._end(seq, "stop")
            return
        seq.completion += 1
        entry = None
        if seq.logprobs is not None:
            entry = self._logprobs(seq.batch_index, token, spec.top_logprobs or 0)
            seq.logprobs.append(entry)
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._piece(token)
        if seq.text.add(piece, entry):
            self._end(seq, "stop")
        elif seq.completion >= spec.max_tokens:
            self._end(seq, "length")
        else:
            seq.next_token = token

    def _greedy_rows(self) -> list[int]:
        """The argmax of the logits of every output row of the step, taken once: what the greedy
        sampler picks for each (the first of equals, as llama.cpp's).

        llama.cpp's sampler copies all the vocabulary's logits into candidates for each sample
        (tens of microseconds a sequence); a step of 64 sequences then costs milliseconds of CPU
        that a GPU waits through.
        """
        rows = np.ctypeslib.as_array(llama_cpp.llama_get_logits(self._ctx), shape=(self._outputs, self._n_vocab))
        # A list: indexing it gives a Python int, without a numpy scalar per sequence.
        self._argmax = argmax = rows.argmax(axis=1).tolist()
        return argmax

    # --- log probabilities ----------------------------------------------------

    def _logprobs(self, index: int, token: int, top: int) -> dict[str, Any]:
        """The model's log probability of ``token`` and of its ``top`` best alternatives.

        From the raw logits (a log-softmax), before penalties, grammar or
        temperature, as OpenAI reports them.
        """
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(self._ctx, index), shape=(self._n_vocab,))
        shifted = logits.astype(np.float64) - float(logits.max())
        logprobs = shifted - math.log(float(np.exp(shifted).sum()))
        best = np.argpartition(-logprobs, top)[:top] if top else np.array([], dtype=np.int64)
        best = best[np.argsort(-logprobs[best], kind="stable")]
        return {
            **self._token_doc(token, float(logprobs[token])),
            "top_logprobs": [self._token_doc(int(t), float(logprobs[t])) for t in best],
        }

    def _token_doc(self, token: int, logprob: float) -> dict[str, Any]:
        piece = self._piece(token)
        return {"token": piece.decode("utf-8", "replace"), "logprob": logprob, "bytes": list(piece)}

    def _piece(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            piece = self._pieces[token] = self._read_piece(token)
        return piece

    def _read_piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(64)
        n = llama_cpp.llama_token_to_piece(self.model.vocab, token, buf, len(buf), 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = llama_cpp.llama_token_to_piece(self.model.vocab, token, buf, len(buf), 0, False)
        return buf.raw[:n]

    # --- ending a sequence ------------------------------------------------------

    def _end(self, seq: _Active, finish: str) -> None:
        try:
            result = self._partial(seq, finish)
        except Exception as exc:  # the last piece could not be streamed
            self._release(seq, None, exc)
            return
        self._release(seq, result)

    def _partial(self, seq: _Active, finish: str) -> SequenceResult:
        """What ``seq`` produced until now, ending it with ``finish``."""
        ended = time.perf_counter()
        first = seq.first_token_at or ended
        # Bytes of a character cut in half by the token or time limit are kept (as U+FFFD).
        text = seq.text.close(flush_bytes=finish in ("length", TIME_LIMIT))
        return SequenceResult(
            text=text,
            prompt_tokens=len(seq.ticket.spec.tokens),
            cached_tokens=seq.cached_tokens,
            completion_tokens=seq.completion,
            finish_reason=finish,
            logprobs=seq.logprobs,
            queue_s=seq.admitted_at - seq.ticket.submitted_at,
            prompt_s=first - seq.admitted_at,
            generation_s=ended - first,
            drafted_tokens=seq.drafted,
            accepted_tokens=seq.accepted,
        )

    def _release(self, seq: _Active, result: SequenceResult | None, error: BaseException | None = None) -> None:
        slot = seq.slot
        # A prompt cut off half-fed needs nothing more: ``cached`` holds what was decoded.
        slot.active, slot.last_used = None, time.perf_counter()
        seq.sampler.close()
        seq.ticket._finish(result, error)

    def _forget(self, slot: _Slot) -> None:
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.cached = []

    def _cancelled_before_start(self, ticket: Ticket) -> SequenceResult:
        return SequenceResult(
            text="", prompt_tokens=len(ticket.spec.tokens), cached_tokens=0, completion_tokens=0,
            finish_reason="cancelled", logprobs=[] if ticket.spec.top_logprobs is not None else None,
            queue_s=time.perf_counter() - ticket.submitted_at, prompt_s=0.0, generation_s=0.0,
        )

