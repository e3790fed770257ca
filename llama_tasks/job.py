"""A unit of work as the herder signs it, and the checks every job must pass.

The herder runs the same checks at admission (before money moves); the worker
runs them again because it trusts nothing it did not verify itself.
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from llama_tasks import embedding_job
from llama_tasks import tools as tool_fields
from llama_tasks.errors import (
    BadLogprobs,
    BadStop,
    ContextOverflow,
    EmptyPrompt,
    InvalidMaxTokens,
    InvalidRequest,
    SamplingOutOfRange,
)
from llama_tasks.registry import DEFAULT_MODEL

#: Allowed range of each sampling parameter, inclusive.
SAMPLING_RANGES: dict[str, tuple[float, float]] = {
    "temperature": (0.0, 2.0),
    "top_p": (0.0, 1.0),
    "top_k": (0, 1000),
    "min_p": (0.0, 1.0),
    "repeat_penalty": (0.5, 2.0),
}
#: max_tokens of a request that names none (the client's and the CLI's default).
DEFAULT_MAX_TOKENS = 128
#: Sampling defaults of every request, whoever builds it (client, gateway, herder, worker).
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_P = 0.95
DEFAULT_TOP_K = 40
DEFAULT_MIN_P = 0.05
DEFAULT_REPEAT_PENALTY = 1.0
#: Largest seed (llama.cpp takes a 32-bit seed; 0xFFFFFFFF means "random").
MAX_SEED = 2**31 - 1
MAX_STOP_STRINGS = 4
MAX_STOP_CHARS = 64
#: Grammars and schemas longer than this are refused before parsing.
MAX_GRAMMAR_CHARS = 64_000
#: Most completions (``n``) one request may ask for: each is a sequence in a worker's batch.
MAX_CHOICES = 8
#: Most alternatives per generated token a request may ask to see (OpenAI's limit).
MAX_TOP_LOGPROBS = 20


#: Chat roles a message may have (what the models' chat templates render; ``tool`` answers a call).
ROLES = ("system", "user", "assistant", "tool")
#: Fields a chat message may carry besides its role and content (``tools`` says which roles).
MESSAGE_EXTRAS = frozenset({"tool_calls", "tool_call_id"})
#: Sampling parameters that must be whole numbers.
INTEGER_SAMPLING = frozenset({"top_k"})


@dataclass(kw_only=True)
class Generation:
    """What a requester may ask of one generation: the one declaration of these
    fields and their defaults, shared by the client, the gateway, the herder
    and the worker (``Job`` adds the envelope, the herder's ``Submission`` the payment).
    """

    model: str = DEFAULT_MODEL
    prompt: str | None = None
    #: ``{role, content}``, plus ``tool_calls`` (assistant) or ``tool_call_id`` (tool): see ``tools``.
    messages: list[dict[str, Any]] | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    stop: list[str] = field(default_factory=list)
    grammar: str | None = None
    json_schema: dict[str, Any] | None = None
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = DEFAULT_TOP_P
    top_k: int = DEFAULT_TOP_K
    min_p: float = DEFAULT_MIN_P
    repeat_penalty: float = DEFAULT_REPEAT_PENALTY
    seed: int | None = None
    #: Completions to generate from the prompt, each sampled on its own; all are paid for.
    n: int = 1
    #: Return each generated token's log probability.
    logprobs: bool = False
    #: With ``logprobs``, also this many likeliest alternatives at each position.
    top_logprobs: int = 0
    #: Function tools the model may call, OpenAI's shape (see ``tools``); None: none.
    tools: list[dict[str, Any]] | None = None
    #: ``auto``, ``none``, ``required`` or ``{"type": "function", "function": {"name"}}``; None: auto with tools.
    tool_choice: str | dict[str, Any] | None = None
    #: Whether one answer may hold several calls.
    parallel_tool_calls: bool = True
    #: Texts or token arrays to embed: set, the job is an embedding job (``llama_tasks.embedding``)
    #: and generates nothing; its prompt, messages and generation fields must stay unset.
    input: list[str | list[int]] | None = None
    #: Size the embeddings are asked in (OpenAI's ``dimensions``); only the model's own is accepted.
    dimensions: int | None = None

    def __post_init__(self) -> None:
        # One stop string or a list of them, as OpenAI accepts; a bare string
        # must not become a list of its characters.
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        elif self.stop is None:
            self.stop = []

    def generation(self) -> dict[str, Any]:
        """The generation fields alone, as JSON-ready values."""
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(Generation)}

    @property
    def is_chat(self) -> bool:
        return self.messages is not None

    @property
    def is_embedding(self) -> bool:
        return self.input is not None


@dataclass(kw_only=True)
class Job(Generation):
    """The signed payload of one generation attempt."""

    job_id: str
    attempt: int
    expires_at: float
    issued_at: float
    #: Whose prompt cache the job may reuse (the herder derives one per account; None: one tenant).
    cache_key: str | None = None
    #: Known only to the herder and whoever received this envelope: the worker proves it received the
    #: attempt by an HMAC under it in its signed result (``signing.receipt_proof``).
    attempt_secret: str = ""

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Job:
        known = {f.name for f in fields(cls)}
        unknown = set(payload) - known
        if unknown:
            raise InvalidRequest(f"unknown fields {sorted(unknown)}")
        try:
            job = cls(**payload)
        except TypeError as exc:  # a required field is missing
            raise InvalidRequest(str(exc)) from None
        if job.cache_key is not None and not (isinstance(job.cache_key, str) and 0 < len(job.cache_key) <= 128):
            raise InvalidRequest("cache_key must be a short string")
        if not isinstance(job.attempt_secret, str) or len(job.attempt_secret) > 128:
            raise InvalidRequest("attempt_secret must be a short string")
        return job

    def to_payload(self) -> dict[str, Any]:
        return asdict(self)


def _encodable(text: str) -> bool:
    """Whether ``text`` is valid Unicode that UTF-8 can carry (no lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_text(name: str, value: object) -> None:
    """Refuse text that cannot travel as UTF-8 (a lone surrogate such as ``"\\ud800"``)."""
    if isinstance(value, str) and not _encodable(value):
        raise InvalidRequest(f"{name} is not valid Unicode text (it contains a lone surrogate)")


def _check_messages(messages: object) -> None:
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty list of {role, content} objects")
    for i, m in enumerate(messages):
        if (not isinstance(m, dict) or not {"role", "content"} <= set(m) <= {"role", "content"} | MESSAGE_EXTRAS
                or not isinstance(m["content"], str)):
            raise InvalidRequest(f"messages[{i}] must be an object with a role and a text content "
                                 "(and tool_calls or tool_call_id)")
        if m["role"] not in ROLES:
            raise InvalidRequest(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {m['role']!r}")
        check_text(f"messages[{i}].content", m["content"])
    tool_fields.check_messages(messages)
    for i, m in enumerate(messages):
        check_text(f"messages[{i}]", json.dumps(m, ensure_ascii=False))
    if not any(m["content"].strip() or m.get("tool_calls") for m in messages):
        raise EmptyPrompt()


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_choices(job: Generation) -> None:
    """``n``, ``logprobs`` and ``top_logprobs``: types, ranges, and alternatives only with logprobs."""
    if not _is_int(job.n) or not 1 <= job.n <= MAX_CHOICES:
        raise SamplingOutOfRange("n", job.n, 1, MAX_CHOICES)
    if not isinstance(job.logprobs, bool):
        raise BadLogprobs("logprobs", f"must be true or false, got {job.logprobs!r}")
    if not _is_int(job.top_logprobs) or not 0 <= job.top_logprobs <= MAX_TOP_LOGPROBS:
        raise SamplingOutOfRange("top_logprobs", job.top_logprobs, 0, MAX_TOP_LOGPROBS)
    if job.top_logprobs and not job.logprobs:
        raise BadLogprobs("top_logprobs", "alternatives are returned only with logprobs true")


def validate(job: Generation, max_tokens_cap: int | None) -> None:
    """Raise the typed error for the first thing wrong with ``job``.

    ``max_tokens_cap`` is the herder's limit; a client that does not know it
    passes None and checks everything else.
    """
    if not isinstance(job.model, str) or not job.model or not job.model.isprintable():
        raise InvalidRequest(f"model must be a model name, got {job.model!r}")
    check_text("model", job.model)
    if job.is_embedding or job.dimensions is not None:
        embedding_job.validate(job)
        return
    if job.messages is not None:
        if job.prompt is not None:
            raise InvalidRequest("give either a prompt or chat messages, not both")
        _check_messages(job.messages)
    elif not isinstance(job.prompt, str) or not job.prompt.strip():
        raise EmptyPrompt()
    check_text("prompt", job.prompt)
    cap = max_tokens_cap if max_tokens_cap is not None else 2**31 - 1
    if isinstance(job.max_tokens, bool) or not isinstance(job.max_tokens, int):
        raise InvalidMaxTokens(job.max_tokens, cap)
    if not 1 <= job.max_tokens <= cap:
        raise InvalidMaxTokens(job.max_tokens, cap)
    for name, (low, high) in SAMPLING_RANGES.items():
        value = getattr(job, name)
        if (
            isinstance(value, bool)
            or not isinstance(value, int if name in INTEGER_SAMPLING else (int, float))
            or (isinstance(value, float) and not math.isfinite(value))  # isfinite overflows on huge ints
            or not low <= value <= high
        ):
            raise SamplingOutOfRange(name, value, low, high)
    if job.seed is not None and (isinstance(job.seed, bool) or not isinstance(job.seed, int) or job.seed < 0):
        raise SamplingOutOfRange("seed", job.seed, 0, MAX_SEED)
    if job.seed is not None and job.seed > MAX_SEED:
        raise SamplingOutOfRange("seed", job.seed, 0, MAX_SEED)
    _check_choices(job)
    if not isinstance(job.stop, list) or len(job.stop) > MAX_STOP_STRINGS:
        raise BadStop(f"at most {MAX_STOP_STRINGS} stop strings")
    for s in job.stop:
        if not isinstance(s, str) or not 1 <= len(s) <= MAX_STOP_CHARS or not _encodable(s):
            raise BadStop(f"each stop string must be 1..{MAX_STOP_CHARS} characters of text, got {s!r}")
    if job.grammar is not None and job.json_schema is not None:
        raise InvalidRequest("give either a grammar or a JSON schema, not both")
    if job.grammar is not None and (not isinstance(job.grammar, str) or len(job.grammar) > MAX_GRAMMAR_CHARS):
        raise InvalidRequest(f"grammar must be a string of at most {MAX_GRAMMAR_CHARS} characters")
    check_text("grammar", job.grammar)
    tool_fields.check(job.tools, job.tool_choice, job.parallel_tool_calls,
                      constrained=job.grammar is not None or job.json_schema is not None)
    if job.tools is not None and not job.is_chat:
        raise InvalidRequest("tools are offered on chat messages only")
    if job.tools is not None:
        _check_json("tools", job.tools)
    if job.json_schema is not None:
        if not isinstance(job.json_schema, dict):
            raise InvalidRequest("json_schema must be a JSON object")
        try:
            size = len(json.dumps(job.json_schema, allow_nan=False, ensure_ascii=False).encode("utf-8"))
        except (ValueError, TypeError, UnicodeEncodeError):
            raise InvalidRequest("json_schema must be plain JSON text (no NaN, Infinity or lone surrogates)") from None
        if size > MAX_GRAMMAR_CHARS:
            raise InvalidRequest(f"json_schema must be at most {MAX_GRAMMAR_CHARS} bytes")


def _check_json(name: str, value: object) -> None:
    try:
        json.dumps(value, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except (ValueError, TypeError, UnicodeEncodeError):
        raise InvalidRequest(f"{name} must be plain JSON text (no NaN, Infinity or lone surrogates)") from None


def check_fits(n_prompt: int, max_tokens: int, n_ctx: int) -> None:
    """Refuse a job whose prompt and completion cannot both fit in ``n_ctx`` tokens."""
    if n_prompt + max_tokens > n_ctx:
        raise ContextOverflow(n_prompt, max_tokens, n_ctx)
