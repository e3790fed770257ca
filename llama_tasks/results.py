"""How a worker hands a finished attempt's result to the herders.

Each result is added to one Redis stream that the herders read as a consumer
group, in batches. Published by the worker itself before its task returns,
it reaches a herder as soon as it is written (a Celery link callback is sent
before Celery stores the result, and costs a task of its own per result).
The result store keeps its copy as well: a herder's tick settles from there
any attempt whose stream entry was lost. Both copies are the one document the
task returns, so an operator's attestation (``signing.ATTESTATION``) rides in
whichever reaches the herder first.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from llama_tasks.constants import RESULTS_STREAM

#: ``ANSWER_PREFIX + <operator>:<job_id>:<attempt>`` → the attempt's result document,
#: kept for a redelivery of its message that meets the attempt already finished
#: (``claims``). Under its operator's name (``-`` for the house), so an operator's
#: broker user may reach its own answers only (``router.core.broker_access``).
ANSWER_PREFIX = "llamas:answer:"

#: The most entries the stream keeps (roughly) while no herder reads it; older
#: ones are trimmed, and the herders' tick settles those from the result store.
MAX_ENTRIES = 100_000


def answer_prefix(operator: str) -> str:
    """Where the answers of ``operator``'s workers are kept (``""``: the house's)."""
    return f"{ANSWER_PREFIX}{operator or '-'}:"


def publish(r: redis.Redis, doc: dict[str, Any], operator: str, keep_s: int) -> None:
    """Add one attempt's result document (it names its task, job and attempt) to
    the stream, and keep a copy for ``keep_s`` seconds (see ``stored``)."""
    raw = json.dumps(doc)
    pipe = r.pipeline()
    pipe.xadd(RESULTS_STREAM, {"doc": raw}, maxlen=MAX_ENTRIES, approximate=True)
    pipe.set(f"{answer_prefix(operator)}{doc['job_id']}:{doc['attempt']}", raw, ex=keep_s)
    pipe.execute()


def stored(r: redis.Redis, operator: str, job_id: str, attempt: int) -> dict[str, Any] | None:
    """The result an attempt of ``operator``'s published, while it is kept."""
    raw = r.get(f"{answer_prefix(operator)}{job_id}:{attempt}")
    doc = json.loads(raw) if raw else None
    return doc if isinstance(doc, dict) else None
