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

#: The most entries the stream keeps (roughly) while no herder reads it; older
#: ones are trimmed, and the herders' tick settles those from the result store.
MAX_ENTRIES = 100_000


def publish(r: redis.Redis, doc: dict[str, Any]) -> None:
    """Add one attempt's result document (it names its task, job and attempt) to the stream."""
    r.xadd(RESULTS_STREAM, {"doc": json.dumps(doc)}, maxlen=MAX_ENTRIES, approximate=True)
