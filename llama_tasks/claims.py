"""Replay protection: each (job id, attempt) is claimed by exactly one message.

A message redelivered after its worker died carries the same Celery task id
and may take over its own unfinished claim; anything else that presents a
claimed attempt — a copied envelope, or the same message after it finished —
is a replay.
"""

from __future__ import annotations

import json

import redis

from llama_tasks.constants import CLAIM_PREFIX
from llama_tasks.errors import Replayed

RUNNING, DONE = "running", "done"


def _key(job_id: str, attempt: int) -> str:
    return f"{CLAIM_PREFIX}{job_id}:{attempt}"


def claim(r: redis.Redis, job_id: str, attempt: int, message_id: str, ttl_s: int) -> None:
    """Claim an attempt for ``message_id`` or raise ``Replayed``."""
    key = _key(job_id, attempt)
    mine = json.dumps({"message": message_id, "state": RUNNING})
    if r.set(key, mine, nx=True, ex=ttl_s):
        return
    held = r.get(key)
    current = json.loads(held) if held else {}
    if current.get("message") == message_id and current.get("state") == RUNNING:
        return  # our own message, redelivered after its worker was lost
    raise Replayed(job_id, attempt)


def finish(r: redis.Redis, job_id: str, attempt: int, message_id: str) -> None:
    """Mark an attempt finished so a later delivery of it is refused."""
    r.set(_key(job_id, attempt), json.dumps({"message": message_id, "state": DONE}), xx=True, keepttl=True)
