"""Worker-side configuration: the one place ``llama_tasks`` reads the environment.

``SharedSettings`` holds what every llamas process reads alike (the home,
Redis, a job's context, the time limits and expiries); ``celeryconfig.py``
turns those into Celery settings. ``WorkerSettings`` adds what only an
inference worker needs (its model, GPUs, slots, threads, the herder's
public key and the operator it runs for); the herder's settings extend
``SharedSettings`` too, not these.
Every field has a default, bounds and a description.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from llama_tasks.registry import DEFAULT_MODEL

#: The broker URL a fresh laptop gets; only this URL may be served by the
#: embedded Redis-compatible server when nothing answers on it.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
#: Slots per worker process. Batching more sequences raises throughput until
#: the machine's compute is saturated (on 2 cores, 8 at once gave 1.3-1.4× the
#: sequential rate in tests/bench/results); each slot costs a KV memory of n_ctx tokens.
DEFAULT_SLOTS = 8
#: What an operator may be called: it names a key file (``<home>/operators/<name>.key``)
#: and an environment value, so no path separators, spaces or leading dots.
OPERATOR_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class SharedSettings(BaseSettings):
    """Settings every llamas process reads alike: workers, the herder and ``celeryconfig.py``."""

    model_config = SettingsConfigDict(env_prefix="LLAMAS_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".llamas",
        description="Directory for keys, the model registry and local state.",
    )
    redis_url: str = Field(DEFAULT_REDIS_URL, description="Broker, result store and streams.")
    n_ctx: int = Field(
        2048, ge=128, le=131072, description="Context of one slot: the most prompt + max_tokens of one job."
    )
    max_tokens_cap: int = Field(2048, ge=1, description="Largest max_tokens a job may ask for.")
    soft_time_limit_s: int = Field(300, ge=1, description="Soft limit for one generation.")
    time_limit_s: int = Field(330, ge=1, description="Hard limit; the child is killed past it.")
    visibility_timeout_s: int = Field(
        3600, ge=1, description="Redis redelivers an unacked message after this long."
    )
    result_expires_s: int = Field(86400, ge=60, description="How long results are kept.")
    heartbeat_interval_s: float = Field(2.0, gt=0, le=60, description="Heartbeat period.")
    stream_ttl_s: int = Field(3600, ge=10, description="Token streams expire after this.")
    claim_ttl_s: int = Field(7 * 86400, ge=60, description="How long replay claims are kept.")

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> SharedSettings:
        # A message still running when the visibility timeout passes would be
        # delivered a second time and generated twice.
        if self.visibility_timeout_s <= self.time_limit_s:
            raise ValueError(
                f"LLAMAS_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}s) must exceed "
                f"LLAMAS_TIME_LIMIT_S ({self.time_limit_s}s), or Redis would hand a running "
                "generation to a second worker"
            )
        if self.soft_time_limit_s >= self.time_limit_s:
            raise ValueError(
                f"LLAMAS_SOFT_TIME_LIMIT_S ({self.soft_time_limit_s}s) must be below "
                f"LLAMAS_TIME_LIMIT_S ({self.time_limit_s}s)"
            )
        return self

    @property
    def public_key_file(self) -> Path:
        return self.home / "herder.pub"

    @property
    def private_key_file(self) -> Path:
        return self.home / "herder.key"

    @property
    def house_public_key_file(self) -> Path:
        """The public half of the key the house's own workers sign their results with."""
        return self.home / "house.pub"

    @property
    def models_file(self) -> Path:
        return self.home / "models.json"


class WorkerSettings(SharedSettings):
    """Settings of an inference worker: the shared ones and the model, GPUs, slots and threads it serves with."""

    model: str = Field(DEFAULT_MODEL, min_length=1, description="Model this worker serves.")
    public_key: str = Field(
        "",
        description="Herder's Ed25519 public key (base64). Empty: read <home>/herder.pub.",
    )
    gpus: str = Field(
        "", description="GPU ids, comma-separated: a worker process serves one; `llamas up` starts one per id."
    )
    slots: int = Field(
        DEFAULT_SLOTS, ge=1, le=256,
        description="Jobs one worker process decodes at once, batched in one context (its task threads).",
    )
    threads: int = Field(
        0, ge=0, le=1024,
        description="CPU threads of llama.cpp in a worker; 0 = every core. Two workers sharing the cores "
        "should split them: llama.cpp's threads wait on each other, and oversubscribed they crawl.",
    )
    operator: str = Field(
        "",
        description="Operator this worker runs for (`llamas operators add NAME`): it signs every result and "
        "heartbeat with the operator's key, and the operator earns its share of each job. Empty: the house.",
    )
    operator_key_file: Path | None = Field(
        None,
        # The documented variable is LLAMAS_OPERATOR_KEY; an alias skips the prefix, hence spelled out.
        validation_alias=AliasChoices("LLAMAS_OPERATOR_KEY", "operator_key_file"),
        description="The operator's Ed25519 private key (PEM). Unset: <home>/operators/<operator>.key.",
    )
    house_key_file: Path | None = Field(
        None,
        validation_alias=AliasChoices("LLAMAS_HOUSE_KEY", "house_key_file"),
        description="A house worker's (no LLAMAS_OPERATOR) Ed25519 private key (PEM), which signs every result, "
        "claim and heartbeat it reports. Unset: <home>/house.key (`llamas keys generate` makes it).",
    )

    draft_tokens: int = Field(
        0, ge=0, le=32,
        description="Speculative decoding from the prompt: at most this many tokens per sequence and step are "
        "drafted from what followed the same tokens earlier in its prompt or answer, and checked in the same "
        "decode; the answer is the same, in fewer steps where text repeats (rewriting, extracting, JSON). "
        "0 = off.",
    )
    backend_sampling: bool = Field(
        True,
        description="Greedy sequences (temperature 0, no repeat penalty, grammar or logprobs) take their token "
        "from llama.cpp's backend sampler: the argmax runs in the decode's graph (on the GPU where there is one) "
        "and no logits cross to the host. The answers are the same either way; false: the worker takes the "
        "argmax of the logits itself.",
    )
    memory_mb: int = Field(
        0, ge=0,
        description="Memory this worker may fill with a model, in MB: what it tells the herder it can hold, and "
        "the most an Init may load. 0 = the machine's RAM on the CPU, and no limit on a GPU (set it there: "
        "the card's memory is not read).",
    )
    sample_limit_s: float = Field(
        5.0, gt=0, le=600,
        description="Longest the engine may take to sample one token of one sequence (milliseconds is normal; "
        "a grammar whose parse exploded spins for minutes). Past it the worker answers every job it holds "
        "(that sequence with what it made, the others to run again) and exits for its supervisor to restart it.",
    )
    shared_prefixes: list[str] = Field(
        default_factory=list,
        description="JSON list of texts that may be reused from any account's prompt cache when a rendered "
        "prompt starts with one (a system prompt everyone uses, say). Everything else in the cache is reused "
        "only for the account that sent it.",
    )

    @field_validator("operator")
    @classmethod
    def _operator_is_a_name(cls, value: str) -> str:
        if value and not OPERATOR_NAME.fullmatch(value):
            raise ValueError(
                f"LLAMAS_OPERATOR={value!r} is not an operator name (letters, digits, '.', '_', '-'; "
                "starting with a letter or digit; at most 100)"
            )
        return value

    @model_validator(mode="after")
    def _gpus_parse(self) -> WorkerSettings:
        _ = self.gpu_ids  # parse early so a typo refuses to start
        return self

    @property
    def gpu_ids(self) -> list[int]:
        """GPU ids from ``gpus``; empty means CPU only."""
        try:
            return [int(part) for part in self.gpus.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"LLAMAS_GPUS must be comma-separated integers, got {self.gpus!r}") from None

    @property
    def queue(self) -> str:
        return queue_for(self.model)

    @property
    def operator_key_path(self) -> Path:
        """Where this worker reads its operator's private key."""
        return self.operator_key_file or operator_key_path(self.home, self.operator)

    @property
    def signer_key_path(self) -> Path:
        """The key this worker signs with: its operator's, or the house's."""
        if self.operator:
            return self.operator_key_path
        return self.house_key_file or house_key_path(self.home)

    def worker_name(self, hostname: str) -> str:
        """The name this worker goes by in heartbeats, claims and results.

        An operator's worker is ``<operator>/<hostname>``: the name is bound to
        the operator whose key signs its beats, so no operator can pass its
        worker off as another's (or as the house's, whose names have no ``/``).
        """
        return f"{self.operator}/{hostname}" if self.operator else hostname


def house_key_path(home: Path) -> Path:
    """Where ``llamas keys generate`` writes, and a house worker looks for, the house's private key."""
    return home / "house.key"


def operator_key_path(home: Path, operator: str) -> Path:
    """Where ``llamas operators add`` writes, and a worker looks for, an operator's private key."""
    return home / "operators" / f"{operator}.key"


#: The queue a worker with no model listens on: nothing is ever sent to it.
IDLE_QUEUE = "llamas.idle"


def queue_for(model: str) -> str:
    """The Celery queue that carries work for ``model``."""
    return f"llama.{model}"


def unacked_keys(operator: str) -> dict[str, str]:
    """kombu's keys for an operator's messages in flight (``broker_transport_options``).

    kombu keeps every delivered, not yet acknowledged message of a Redis
    broker in one hash (``unacked``) by default: any worker could read every
    other worker's jobs there. An operator's workers keep theirs under keys of
    their own, which its broker user alone may touch (``router.core.broker_access``).
    """
    return {option: f"{default}:{operator}" for option, default in
            (("unacked_key", "unacked"), ("unacked_index_key", "unacked_index"),
             ("unacked_mutex_key", "unacked_mutex"))}


def exit_on_invalid(exc: ValidationError) -> SystemExit:
    """A one-line refusal to start that names every bad setting."""
    reasons = "; ".join(
        str(e["msg"]).removeprefix("Value error, ")
        + (f" (LLAMAS_{str(e['loc'][0]).upper()})" if e.get("loc") else "")
        for e in exc.errors()
    )
    return SystemExit(f"llamas: invalid configuration: {reasons}")


@lru_cache(maxsize=1)
def get_settings() -> WorkerSettings:
    """The worker process's settings; a process with invalid settings exits with the reason."""
    try:
        return WorkerSettings()
    except ValidationError as exc:
        # Raised as SystemExit so `celery -A ...` prints one clear line
        # instead of wrapping it in an import-error traceback.
        raise exit_on_invalid(exc) from None


@lru_cache(maxsize=1)
def get_shared_settings() -> SharedSettings:
    """The settings every process reads alike (``celeryconfig.py``); invalid ones exit with the reason.

    A herder or an agent reads these, not ``get_settings()``: a worker-only
    setting (a GPU list, say) must not stop a process that does not use it.
    """
    try:
        return SharedSettings()
    except ValidationError as exc:
        raise exit_on_invalid(exc) from None


def cpu_count() -> int:
    return os.cpu_count() or 1
