"""The parts a herder is made of, as protocols: what ``HerderService`` needs
from the world, so a process can wire real ones (SQL, Celery, Redis) and a
test or an embedding program can wire its own (see ``router.herder.stub``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from llama_tasks.job import Job
from llama_tasks.registry import ModelSpec
from router.core.models import JobRow

#: Unix time in seconds.
Clock = Callable[[], float]


class HerdSource(Protocol):
    """The live workers, as their heartbeats describe them; may be a moment
    old unless ``fresh`` is asked for."""

    def __call__(self, fresh: bool = False) -> list[dict[str, Any]]: ...


class TokenCounting(Protocol):
    """Counts tokens exactly as the workers will (the model's own tokenizer)."""

    def models(self) -> dict[str, ModelSpec]: ...

    def prompt_tokens(self, job: Job) -> int: ...

    def check_grammar(self, job: Job) -> None: ...

    def input_tokens(self, job: Job) -> list[int]:
        """Tokens in each input of an embedding job."""

    def embedding_size(self, model: str) -> int:
        """Dimensions of ``model``'s embeddings."""

    def completion_tokens(self, model: str, text: str) -> int:
        """Tokens in ``text`` as the tokenizer splits it (settlement charges what workers signed instead)."""

    def model_id(self, model: str) -> str: ...


@dataclass(frozen=True)
class StoredResult:
    """What the result store says an attempt ended with: ``done`` (with the
    worker's document) or ``failed`` (with the exception it raised)."""

    state: str
    document: dict[str, Any] | None = None
    error: BaseException | None = None


class Transport(Protocol):
    """How signed work reaches the herd, and where its results can be looked up."""

    def send(self, row: JobRow, envelope: dict[str, Any]) -> None:
        """Put one attempt's envelope on its model's queue (after the claim committed)."""

    def stored_results(self, task_ids: Iterable[str]) -> dict[str, StoredResult]:
        """The outcomes already stored for these attempts; attempts still running are left out."""


class Forwarder(Protocol):
    """Delivers a final response to the channels a request named."""

    def to_handle(self, response: dict[str, Any], times: tuple[float, float | None, float | None]) -> None:
        """To the requester's waiting handle; ``times`` = created, dispatched, finished."""

    def to_callback(self, task: str, queue: str, response: dict[str, Any]) -> None:
        """As a Celery task on the requester's own queue."""

    def to_webhook(self, job_id: str) -> None:
        """Schedule the signed webhook POST (it reads the job itself)."""
