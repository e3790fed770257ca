"""Herder configuration: the one place ``router`` reads the environment."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from llama_tasks.settings import DEFAULT_REDIS_URL


class HerderSettings(BaseSettings):
    """Settings of the herder, the gateway and the ``llamas`` CLI."""

    model_config = SettingsConfigDict(env_prefix="LLAMAS_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: Path.home() / ".llamas",
        description="Directory for keys, the model registry and the SQLite ledger.",
    )
    redis_url: str = Field(DEFAULT_REDIS_URL, description="Broker, result store and streams.")
    database_url: str = Field(
        "", description="SQLAlchemy URL of the ledger; empty = SQLite file <home>/ledger.db."
    )
    base_fee: int = Field(1, ge=0, description="Flat fee per request, smallest money unit.")
    fee_per_token: int = Field(1, ge=0, description="Fee per prompt or completion token.")

    @property
    def ledger_url(self) -> str:
        return self.database_url or f"sqlite:///{self.home / 'ledger.db'}"


@lru_cache(maxsize=1)
def get_settings() -> HerderSettings:
    return HerderSettings()
