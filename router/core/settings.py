"""Herder configuration: the one place ``router`` reads the environment.

``HerderSettings`` extends the settings every llamas process shares (same
``LLAMAS_`` names for Redis, home, context window and time limits), adding
the herder's own. It carries none of a worker's (model, GPUs, slots,
threads): ``llamas up``, which starts workers, reads those from
``llama_tasks.settings``.
"""

from __future__ import annotations

from decimal import Decimal
from functools import lru_cache
from typing import Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from llama_tasks.constants import GRAMMAR_STEP_BUDGET_S
from llama_tasks.settings import SharedSettings, exit_on_invalid
from router.core.fees import PPM

#: The queue the herder's Celery worker consumes.
HERDER_QUEUE = "herder"
#: Shares are kept in millionths, an integer, as bids are (``fees.PPM``).


class HerderSettings(SharedSettings):
    """Settings of the herder, the gateway and the ``llamas`` CLI."""

    service_name: str = Field("llamas", description="Name reported by Info.")
    api_key: str = Field("", description="The CLI's API key (`llamas run`, `llamas jobs`).")
    database_url: str = Field(
        "", description="SQLAlchemy URL of the ledger; empty = SQLite file <home>/ledger.db."
    )
    sqlite_synchronous: Literal["FULL", "NORMAL"] = Field(
        "NORMAL",
        description="SQLite ledger only: FULL syncs every commit to disk; NORMAL (WAL) syncs at checkpoints, "
        "which survives any crash of our processes but may lose the last commits to a power cut or an OS "
        "crash (books still balance: a lost commit is lost whole). Use PostgreSQL where that matters.",
    )
    base_fee: int = Field(1, ge=0, description="Flat fee per request, smallest money unit.")
    fee_per_token: int = Field(1, ge=0, description="Fee per prompt or completion token.")
    fee_per_cached_token: int | None = Field(
        None, ge=0,
        description="Fee per prompt token a worker reused from its prompt cache, at most "
        "fee_per_token; unset = fee_per_token. Quotes assume nothing is cached.",
    )
    fee_per_embedding_token: int = Field(
        1, ge=0,
        description="Fee per input token of an embedding request (/v1/embeddings, `Herder.embed`, `llamas embed`): "
        "its quote is base_fee + this × the input tokens, and that is what it is charged (times its multiplier).",
    )
    max_queue: int = Field(1000, ge=1, description="Queued jobs past which requests are refused.")
    aging_per_s: float = Field(
        0.0, ge=0, description="Multiplier a waiting job's effective bid gains per second."
    )
    lease_grace_s: float = Field(
        30.0, ge=0, description="A dispatched job's lease is the hard time limit plus this."
    )
    max_attempts: int = Field(3, ge=1, le=20, description="Dispatches before a job fails.")
    max_request_bytes: int = Field(
        256_000, ge=1024, description="Largest request (prompt, messages, grammar) in bytes."
    )
    grammar_step_budget_ms: float = Field(
        GRAMMAR_STEP_BUDGET_S * 1000, ge=0, le=60_000,
        description="Most a grammar or JSON schema may cost per sampled token, as the admission probe measures "
        "it on the model's vocabulary; a dearer one is refused (422 GrammarTooCostly) before anything is held. "
        "0 = no probe (requesters you trust; workers still cut off a sampler that stalls, LLAMAS_SAMPLE_LIMIT_S).",
    )
    tick_s: float = Field(1.0, gt=0, le=60, description="Period of dispatch, leases and deadlines.")
    placement: Literal["off", "demand"] = Field(
        "off",
        description="demand: every tick the herder moves idle or under-used workers towards the models whose "
        "queue waits (an Init), and admits requests for a model no worker serves but one could load. off: "
        "each worker serves the model it was started with or told to serve (`llamas workers init`); a "
        "request for a model nobody serves is refused at once.",
    )
    placement_dwell_s: float = Field(
        30.0, ge=0, le=3600,
        description="Demand placement: least time a worker serves a model before it may be moved again "
        "(a worker serving nothing may be placed at once).",
    )
    placement_wait_s: float = Field(
        2.0, ge=0, le=3600,
        description="Demand placement: how long a model's oldest queued job must have waited before a worker "
        "serving another model is moved to it (a model no worker serves gets one at once).",
    )
    response_ttl_s: int = Field(86400, ge=60, description="How long responses wait for handles.")
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=600,
        description="Deadline of one webhook try as a whole: connecting, sending and reading the reply's last "
        "byte. A receiver still answering then is cut off, and the try counts as failed.",
    )
    webhook_attempts: int = Field(5, ge=1, le=20, description="Tries per webhook delivery.")
    webhook_allow_hosts: str = Field(
        "",
        description="Comma-separated host names or IP addresses that webhooks may target even though "
        "they are loopback, link-local or private (refused by default).",
    )
    operator_share: Decimal = Field(
        Decimal("0.8"), ge=0, le=1, allow_inf_nan=False,
        description="Fraction of each job's charge paid to the operator whose worker produced it (its "
        "signed result verified); the rest, and everything from workers of no verified operator, goes to "
        "the house. At most 6 decimal places.",
    )
    admin_key: str = Field(
        "",
        description="Admin key: when set, /metrics requires `Authorization: Bearer <admin key>`, and only it "
        "sees worker host names and the gateway's pid in /info.",
    )
    max_body_bytes: int = Field(
        2_097_152, ge=1024,
        description="Largest HTTP request body the gateway reads, in bytes; a longer one is refused with 413 "
        "before it is read (room for a request of LLAMAS_MAX_REQUEST_BYTES written with JSON escapes).",
    )
    max_json_depth: int = Field(
        64, ge=4, le=500, description="Deepest nesting of arrays and objects in a JSON request body."
    )
    max_json_string_bytes: int = Field(
        1_048_576, ge=256, description="Longest string in a JSON request body, in bytes as sent (escapes included)."
    )
    max_streams_per_key: int = Field(
        16, ge=1,
        description="Server-sent-event streams (streamed completions and dashboard tabs) one key may hold open "
        "at once, over every gateway sharing the Redis; the next is refused with 429.",
    )
    dashboard_session_s: int = Field(
        43_200, ge=60, description="How long a dashboard sign-in lasts, in seconds."
    )
    account_max_queued: int = Field(
        100, ge=1,
        description="Jobs one account may have waiting in the queue; keep it well below max_queue so one "
        "account fills only its share. `llamas accounts limits NAME --queued N` sets an account's own.",
    )
    account_max_in_flight: int = Field(
        4, ge=1,
        description="Slots one account's running jobs may hold at once over the whole herd (a job of n choices "
        "holds n, and one of more choices than this is refused); the rest wait in the queue, so one account never "
        "takes every slot. `llamas accounts limits NAME --in-flight N` sets an account's own.",
    )
    account_requests_per_minute: int = Field(
        600, ge=0,
        description="Requests one account may have admitted in any 60 s; 0 = no limit. "
        "`llamas accounts limits NAME --rpm N` sets an account's own.",
    )
    account_tokens_per_minute: int = Field(
        1_000_000, ge=0,
        description="Tokens (prompt + n × max_tokens, as quoted) one account may have admitted in any 60 s; "
        "0 = no limit. `llamas accounts limits NAME --tpm N` sets an account's own.",
    )
    account_max_request_tokens: int = Field(
        8192, ge=1,
        description="Largest n × max_tokens of one request. "
        "`llamas accounts limits NAME --request-tokens N` sets an account's own.",
    )
    text_retention_s: int = Field(
        3600, ge=0, le=366 * 86400,
        description="How long a finished job's prompt and completion text is kept once its delivery is "
        "over (finished + the longest webhook delivery), in the ledger and in Redis; then it is erased and "
        "only its figures (tokens, money, timings, finish reasons, hashes) stay. 0 erases it as soon as "
        "delivery is over.",
    )
    webhook_backoff_s: float = Field(
        2.0, gt=0, le=3600,
        description="Pause before a failed webhook's second try; doubled for each further try, at most 60 s "
        "or this value, whichever is larger.",
    )
    secrets_key: str = Field(
        "",
        description="Key (32 bytes in base64) that seals webhook secrets in the ledger; empty = "
        "<home>/secrets.key, made on first use. Every herder and gateway of one ledger needs the same key.",
    )

    @model_validator(mode="after")
    def _fees_are_positive(self) -> HerderSettings:
        # A zero quote would make every bid a division by zero and every job free.
        if self.base_fee == 0 and self.fee_per_token == 0:
            raise ValueError("LLAMAS_BASE_FEE and LLAMAS_FEE_PER_TOKEN cannot both be 0")
        if self.base_fee == 0 and self.fee_per_embedding_token == 0:
            raise ValueError("LLAMAS_BASE_FEE and LLAMAS_FEE_PER_EMBEDDING_TOKEN cannot both be 0")
        # Quotes price every prompt token as uncached: a dearer cached token
        # could cost more than the hold that was meant to cover the worst case.
        if self.fee_per_cached_token is not None and self.fee_per_cached_token > self.fee_per_token:
            raise ValueError("LLAMAS_FEE_PER_CACHED_TOKEN cannot exceed LLAMAS_FEE_PER_TOKEN")
        return self

    @field_validator("operator_share")
    @classmethod
    def _share_in_millionths(cls, value: Decimal) -> Decimal:
        # Kept as exact millionths, so a share never rounds differently on two herders.
        if (value * PPM) % 1:
            raise ValueError(f"LLAMAS_OPERATOR_SHARE={value} has more than 6 decimal places")
        return value

    @property
    def operator_share_ppm(self) -> int:
        """``operator_share`` in millionths: the integer settlement splits charges with."""
        return int(self.operator_share * PPM)

    @property
    def cached_token_fee(self) -> int:
        """The fee per cached prompt token in force: ``fee_per_cached_token``, or ``fee_per_token``."""
        return self.fee_per_token if self.fee_per_cached_token is None else self.fee_per_cached_token

    @property
    def webhook_allowed(self) -> set[str]:
        """Hosts exempt from the private-address refusal, lower-cased."""
        return {h.strip().lower() for h in self.webhook_allow_hosts.split(",") if h.strip()}

    @property
    def ledger_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'ledger.db'}"

    @property
    def lease_s(self) -> float:
        return self.time_limit_s + self.lease_grace_s

    def webhook_pause_s(self, retries: int) -> float:
        """The pause before a webhook's try number ``retries + 2`` (after ``retries + 1`` failed)."""
        return min(max(60.0, self.webhook_backoff_s), self.webhook_backoff_s * 2 ** retries)

    @property
    def webhook_delivery_s(self) -> float:
        """The longest a webhook delivery can take: every try at its deadline, with every pause between."""
        attempts = self.webhook_attempts
        return attempts * self.webhook_timeout_s + sum(self.webhook_pause_s(n) for n in range(attempts - 1))

    @property
    def text_kept_s(self) -> float:
        """How long after a job finishes its text is erased: its delivery, then the retention."""
        return self.webhook_delivery_s + self.text_retention_s


@lru_cache(maxsize=1)
def get_settings() -> HerderSettings:
    try:
        return HerderSettings()
    except ValidationError as exc:
        raise exit_on_invalid(exc) from None
