"""Agent configuration: the one place ``agent`` reads the environment.

Every field has a default, bounds and a description. ``home`` and
``redis_url`` are the same ``LLAMAS_HOME`` and ``LLAMAS_REDIS_URL`` the
workers and the herder read; everything else is the agent's own.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from agent.grading import DEFAULT_METHOD
from llama_tasks.registry import DEFAULT_MODEL
from llama_tasks.settings import DEFAULT_REDIS_URL, exit_on_invalid

#: The queue the agent's Celery worker consumes by default.
AGENT_QUEUE = "agent"


class AgentSettings(BaseSettings):
    """Settings of the example agent, its chatbot, its paper exchange and their CLI."""

    model_config = SettingsConfigDict(env_prefix="LLAMAS_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".llamas",
        description="Directory for local state (shared with the service).",
    )
    redis_url: str = Field(DEFAULT_REDIS_URL, description="Broker, chat rooms and the herder's responses.")

    # --- the trading agent ---------------------------------------------------
    agent_api_key: str = Field("", description="The agent's API key at the herder (required to run).")
    agent_room: str = Field("lobby", min_length=1, max_length=64, description="Chat room the agent grades.")
    agent_history_n: int = Field(3, ge=1, le=50, description="Messages graded per tick (ChatHistory N).")
    agent_interval_s: float = Field(30.0, gt=0, le=86400, description="Seconds between ticks (beat).")
    agent_queue: str = Field(AGENT_QUEUE, min_length=1, max_length=200,
                             description="Celery queue of the agent's tasks and responses.")
    agent_method: str = Field(DEFAULT_METHOD, min_length=1, description="Grading method (see `llamas agent accuracy`).")
    agent_model: str = Field(DEFAULT_MODEL, min_length=1, description="Model the agent asks for.")
    agent_fee: int | None = Field(None, ge=0, description="Absolute fee offered per request; overrides the multiplier.")
    agent_multiplier: float = Field(1.0, ge=1.0, le=1000.0, description="Offer as a multiple of the quote.")
    agent_deadline_s: float = Field(
        120.0, gt=0, description="A request not started by then is expired and refunded by the herder."
    )
    agent_response_timeout_s: float = Field(
        900.0, gt=0, description="A tick with no response after this long counts as an Error."
    )
    agent_database_url: str = Field(
        "", description="SQLAlchemy URL of the agent's outcomes; empty = SQLite file <home>/agent.db."
    )

    # --- the paper exchange ----------------------------------------------------
    agent_exchange_url: str = Field(
        "", description="SQLAlchemy URL of the paper exchange; empty = SQLite file <home>/exchange.db."
    )
    agent_exchange_account: str = Field("agent", min_length=1, max_length=64,
                                        description="The agent's account at the exchange.")
    agent_exchange_deposit: int = Field(
        100_000, ge=0, description="Quote tokens the paper account opens with (once), smallest unit."
    )
    agent_quote_token: str = Field("CRED", min_length=1, max_length=16, description="Token the agent pays with.")
    agent_trade_token: str = Field("LLAMA", min_length=1, max_length=16, description="Token the agent buys.")
    agent_price: int = Field(250, ge=1, description="Paper price: quote units per trade unit.")
    agent_order_quantity: int = Field(1_000, ge=1, description="Quote units spent per buy.")

    # --- the chatbot -----------------------------------------------------------
    agent_chat_room: str = Field("", max_length=64, description="Room the chatbot joins; empty = no chatbot.")
    agent_chat_nick: str = Field("llamabot", min_length=1, max_length=32, description="The chatbot's nickname.")
    agent_chat_interval_s: float = Field(1.0, gt=0, le=3600, description="Seconds between looks at the room.")
    agent_chat_history_n: int = Field(4, ge=1, le=50, description="Messages the reply is based on.")
    agent_chat_max_tokens: int = Field(40, ge=1, le=512, description="Longest reply, in tokens.")
    agent_chat_terminate: str = Field("\n", min_length=1, max_length=16,
                                      description="Terminate symbol: the reply is cut where it first appears.")

    @model_validator(mode="after")
    def _timeouts_are_consistent(self) -> AgentSettings:
        # A tick declared lost before the herder could even expire it would
        # count an Error for a request that may still be answered and charged.
        if self.agent_response_timeout_s <= self.agent_deadline_s:
            raise ValueError(
                f"LLAMAS_AGENT_RESPONSE_TIMEOUT_S ({self.agent_response_timeout_s}s) must exceed "
                f"LLAMAS_AGENT_DEADLINE_S ({self.agent_deadline_s}s)"
            )
        return self

    @property
    def database_url(self) -> str:
        return self.agent_database_url or f"sqlite:///{self.home / 'agent.db'}"

    @property
    def exchange_url(self) -> str:
        return self.agent_exchange_url or f"sqlite:///{self.home / 'exchange.db'}"

    @property
    def models_file(self) -> Path:
        """The model registry the accuracy command loads models from (the workers' own)."""
        return self.home / "models.json"

    @property
    def beat_schedule_file(self) -> Path:
        # Not the herder's file: two beats sharing one shelve would corrupt it.
        return self.home / "agent-celerybeat-schedule"


def load_settings() -> AgentSettings:
    """Fresh settings from the environment; invalid ones exit with one line naming them."""
    try:
        return AgentSettings()
    except ValidationError as exc:
        raise exit_on_invalid(exc) from None


@lru_cache(maxsize=1)
def get_settings() -> AgentSettings:
    """The process's settings, read once."""
    return load_settings()
