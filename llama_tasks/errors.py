"""The worker's exception tree.

Every error carries its facts as constructor arguments (kept in ``args``), so
Celery's JSON result backend rebuilds the same type with the same fields on
the other side (it stores the class path and ``args``).
"""

from __future__ import annotations

from typing import Any, ClassVar


class LlamasError(Exception):
    """Raised when anything in the inference workers goes wrong."""

    #: Names of the constructor arguments, in order.
    fields: ClassVar[tuple[str, ...]] = ()
    #: Template filled from the fields for ``str()``.
    template: ClassVar[str] = ""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)

    def __getattr__(self, name: str) -> Any:
        fields = type(self).fields
        if name in fields and len(self.args) == len(fields):
            return self.args[fields.index(name)]
        raise AttributeError(name)

    def as_dict(self) -> dict[str, Any]:
        """Fields by name: what an API puts in its error body."""
        return dict(zip(self.fields, self.args))

    def __str__(self) -> str:
        if self.template and len(self.args) == len(self.fields):
            return self.template.format(**self.as_dict())
        return super().__str__()


# --- configuration: the worker refuses to start -----------------------------


class ConfigError(LlamasError):
    """Raised when the worker's configuration cannot work."""


class UnknownModel(ConfigError):
    """Raised when a model name is not in the registry."""

    fields = ("model", "known")
    template = "unknown model {model!r}; known models: {known}"


class ModelFileMissing(ConfigError):
    """Raised when a registered model's GGUF file does not exist."""

    fields = ("model", "path")
    template = "model {model!r}: GGUF file not found at {path}"


class ModelHashMismatch(ConfigError):
    """Raised when a GGUF file's sha256 is not the registered model id."""

    fields = ("model", "path", "expected", "actual")
    template = "model {model!r}: {path} has sha256 {actual}, registry says {expected}"


class ModelTooLarge(ConfigError):
    """Raised when a model's file is larger than the memory this worker declares it can hold."""

    fields = ("name", "needed_mb", "available_mb")
    template = "model {name!r} needs {needed_mb} MB, this worker can hold {available_mb} MB"


class ModelIdMismatch(ConfigError):
    """Raised when an Init names a model whose id is not the one this worker's registry gives that name."""

    fields = ("name", "asked", "registered")
    template = "model {name!r} is {registered} in this worker's registry, not {asked}"


class MissingPublicKey(ConfigError):
    """Raised when no herder public key is configured."""

    fields = ("path",)
    template = (
        "no herder public key: set LLAMAS_PUBLIC_KEY or create {path} "
        "(`llamas keys generate`)"
    )


class MissingOperatorKey(ConfigError):
    """Raised when a worker is run for an operator whose private key it cannot read."""

    fields = ("operator", "path", "reason")
    template = (
        "LLAMAS_OPERATOR={operator!r} but its key {path} cannot be used ({reason}): copy there the key "
        "`llamas operators add` wrote, or point LLAMAS_OPERATOR_KEY at it"
    )


class MissingHouseKey(ConfigError):
    """Raised when a house worker cannot read the key that signs what it reports."""

    fields = ("path", "reason")
    template = (
        "the house's workers sign every result with {path}, which cannot be used ({reason}): `llamas keys "
        "generate` makes it beside the herder's key; copy it here, or point LLAMAS_HOUSE_KEY at it"
    )


class OneGpuPerProcess(ConfigError):
    """Raised when one batching worker process is given several GPUs."""

    fields = ("gpus",)
    template = (
        "LLAMAS_GPUS={gpus!r} names several GPUs, and one worker process serves one GPU: "
        "start one worker per GPU (LLAMAS_GPUS=<id> each), or let `llamas up` start them"
    )


class UnsupportedPool(ConfigError):
    """Raised when a worker is started with a pool other than threads."""

    fields = ("pool",)
    template = (
        "-P {pool} is not supported: a llamas worker is one process whose task threads share one "
        "batch engine (the default pool, threads; -c sets its slots)"
    )


# --- envelopes: rejected, never generated, never retried --------------------


class Rejected(LlamasError):
    """Raised when a work envelope is refused before any generation."""


class Unsigned(Rejected):
    """Raised when a task arrives without a signed envelope."""

    template = "envelope is not signed"


class BadSignature(Rejected):
    """Raised when the signature does not match the envelope's payload."""

    template = "envelope signature does not verify"


class UnknownSigner(Rejected):
    """Raised when the envelope was signed by a key other than the herder's."""

    fields = ("key_id", "expected")
    template = "envelope signed by key {key_id}, workers trust only {expected}"


class Expired(Rejected):
    """Raised when the envelope's expiry has passed."""

    fields = ("job_id", "expires_at", "now")
    template = "job {job_id} expired at {expires_at:.3f} (now {now:.3f})"


class LeaseEnding(Expired):
    """Raised when the envelope's lease ends too soon to generate anything before it: the herder sends it again."""

    fields = ("job_id", "expires_at", "now")
    template = "job {job_id}: its lease ends at {expires_at:.3f}, too soon after now ({now:.3f}) to generate"


class Replayed(Rejected):
    """Raised when a job attempt was already claimed by another message."""

    fields = ("job_id", "attempt")
    template = "job {job_id} attempt {attempt} was already claimed"


class AlreadyAnswered(Replayed):
    """Raised when a message meets its own attempt's claim already finished:
    it was redelivered after its worker had answered (``runtime`` returns the stored answer)."""


class WrongModel(Rejected):
    """Raised when the envelope names a model this worker does not serve."""

    fields = ("job_model", "worker_model")
    template = "job is for model {job_model!r}, this worker serves {worker_model!r}"


class NotAnInit(Rejected):
    """Raised when a control message is not a well-formed Init."""

    fields = ("detail",)
    template = "not an Init: {detail}"


class NotForThisWorker(Rejected):
    """Raised when a signed Init names another worker (it was copied to this one's list)."""

    fields = ("addressee", "worker")
    template = "Init is addressed to {addressee!r}, this worker is {worker!r}"


class InitExpired(Rejected):
    """Raised when an Init arrives after its expiry, or was issued before this worker started."""

    fields = ("nonce", "detail")
    template = "Init {nonce} is stale: {detail}"


class InitReplayed(Rejected):
    """Raised when an Init's nonce was already taken: the same message, sent again."""

    fields = ("nonce",)
    template = "Init {nonce} was already received once"


# --- invalid input: a typed error, never retried ----------------------------


class InvalidRequest(LlamasError):
    """Raised when a job's parameters cannot be generated."""

    fields: ClassVar[tuple[str, ...]] = ("reason",)
    template = "invalid request: {reason}"


class EmptyPrompt(InvalidRequest):
    """Raised when the prompt (or every chat message) is empty."""

    fields = ()
    template = "prompt is empty"


class InvalidMaxTokens(InvalidRequest):
    """Raised when max_tokens is outside 1..cap."""

    fields = ("max_tokens", "cap")
    template = "max_tokens must be between 1 and {cap}, got {max_tokens}"


class ContextOverflow(InvalidRequest):
    """Raised when prompt tokens plus max_tokens exceed the context window."""

    fields = ("prompt_tokens", "max_tokens", "n_ctx")
    template = (
        "prompt of {prompt_tokens} tokens + max_tokens {max_tokens} "
        "exceeds the context window of {n_ctx} tokens"
    )


class SamplingOutOfRange(InvalidRequest):
    """Raised when a sampling parameter is outside its allowed range."""

    fields = ("name", "value", "low", "high")
    template = "{name}={value} is outside [{low}, {high}]"


class BadGrammar(InvalidRequest):
    """Raised when a GBNF grammar or JSON schema does not parse."""

    fields = ("detail",)
    template = "grammar does not parse: {detail}"


class BadTools(InvalidRequest):
    """Raised when a request's tools, tool_choice or tool-call messages cannot be honoured."""

    fields = ("param", "reason")
    template = "invalid {param}: {reason}"


class GrammarTooCostly(InvalidRequest):
    """Raised when sampling under a grammar or JSON schema would cost more per token than allowed."""

    fields = ("step_ms", "budget_ms")
    template = (
        "the grammar is too costly to sample: one token would take at least {step_ms} ms (the budget is "
        "{budget_ms} ms); "
        "ambiguous nested repetitions such as ((x{{0,30}}){{0,30}}){{0,30}} multiply llama.cpp's parse stacks"
    )


class BadLogprobs(InvalidRequest):
    """Raised when logprobs or top_logprobs ask for something that cannot be given."""

    fields = ("param", "detail")
    template = "bad {param}: {detail}"


class BadStop(InvalidRequest):
    """Raised when stop strings are too many, too long or empty."""

    fields = ("detail",)
    template = "bad stop strings: {detail}"


class GenerationTimedOut(InvalidRequest):
    """Raised when a generation runs past the soft time limit (not retried: it would again)."""

    fields = ("limit_s",)
    template = "generation took longer than {limit_s}s"


class BadInput(InvalidRequest):
    """Raised when an embedding request's input is not text or tokens the model can take."""

    fields: ClassVar[tuple[str, ...]] = ("param", "detail")
    template = "bad {param}: {detail}"


class EmptyInput(BadInput):
    """Raised when an embedding request has no input, or one of its inputs is empty."""

    fields = ("param",)
    template = "{param} is empty: every input must hold at least one character or token"


class InputTooLong(BadInput):
    """Raised when one input to embed has more tokens than the model's context holds."""

    fields = ("param", "tokens", "n_ctx")
    template = "{param} has {tokens} tokens; the model's context holds {n_ctx}"


# --- the engine: the attempt failed, another may succeed --------------------


class EngineFailed(LlamasError):
    """Raised when the batch engine cannot decode (llama.cpp refused, or it is stopping)."""

    fields = ("detail",)
    template = "the engine failed: {detail}"
