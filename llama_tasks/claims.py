"""Replay protection: each (job id, attempt) is claimed by exactly one message.

A message redelivered after its worker died carries the same Celery task id
and may take over its own unfinished claim; anything else that presents a
claimed attempt — a copied envelope, or the same message after it finished —
is a replay.
"""

from __future__ import annotations

import json
from typing import Any

import redis

from llama_tasks.constants import CLAIM_PREFIX
from llama_tasks.errors import Replayed

RUNNING, DONE = "running", "done"


def _key(job_id: str, attempt: int) -> str:
    return f"{CLAIM_PREFIX}{job_id}:{attempt}"


def claim(r: redis.Redis, job_id: str, attempt: int, message_id: str, ttl_s: int,
          worker: str = "", pid: int = 0) -> None:
    """Claim an attempt for ``message_id`` or raise ``Replayed``.

    The claim names the worker and process running it, so the herder can tell
    an attempt whose process died (see ``holder``) long before its lease ends.
    """
    key = _key(job_id, attempt)
    mine = json.dumps({"message": message_id, "state": RUNNING, "worker": worker, "pid": pid})
    if r.set(key, mine, nx=True, ex=ttl_s):
        return
    held = r.get(key)
    current = json.loads(held) if held else {}
    if current.get("message") == message_id and current.get("state") == RUNNING:
        # Our own message, redelivered after its worker was lost: now ours.
        r.set(key, mine, xx=True, keepttl=True)
        return
    raise Replayed(job_id, attempt)


def holders(r: redis.Redis, attempts: list[tuple[str, int]]) -> list[dict[str, Any] | None]:
    """The claim of each (job id, attempt): message, state, worker and pid, or None."""
    if not attempts:
        return []
    raw = r.mget([_key(job_id, attempt) for job_id, attempt in attempts])
    return [json.loads(v) if v else None for v in raw]


def finish(r: redis.Redis, job_id: str, attempt: int, message_id: str, worker: str = "", pid: int = 0) -> None:
    """Mark an attempt finished so a later delivery of it is refused."""
    done = {"message": message_id, "state": DONE, "worker": worker, "pid": pid}
    r.set(_key(job_id, attempt), json.dumps(done), xx=True, keepttl=True)
