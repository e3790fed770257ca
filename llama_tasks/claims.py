"""Replay protection: each (job id, attempt) is claimed by exactly one message.

A message redelivered after its worker died carries the same Celery task id
and may take over its own unfinished claim; the same message after its
attempt finished is told so (``AlreadyAnswered``: its worker returns the
answer it stored); anything else that presents a claimed attempt — a copied
envelope — is a replay.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import redis

from llama_tasks.constants import CLAIM_PREFIX
from llama_tasks.errors import AlreadyAnswered, Replayed

RUNNING, DONE = "running", "done"

#: Signs a claim document with the key of whoever runs the worker (``OperatorSigner.sign_claim``).
Sign = Callable[[dict[str, Any]], dict[str, Any]]


def _doc(job_id: str, attempt: int, message_id: str, state: str, worker: str, pid: int,
         sign: Sign | None) -> str:
    doc = {"job_id": job_id, "attempt": attempt, "message": message_id, "state": state, "worker": worker, "pid": pid}
    return json.dumps(sign(doc) if sign is not None else doc)


def _key(job_id: str, attempt: int) -> str:
    return f"{CLAIM_PREFIX}{job_id}:{attempt}"


def claim(r: redis.Redis, job_id: str, attempt: int, message_id: str, ttl_s: int,
          worker: str = "", pid: int = 0, sign: Sign | None = None) -> None:
    """Claim an attempt for ``message_id`` or raise ``Replayed``.

    The claim names the worker and process running it, so the herder can tell
    an attempt whose process died (see ``holder``) long before its lease ends;
    signed (``sign``), it also tells the herder whose result to pay for.
    """
    key = _key(job_id, attempt)
    mine = _doc(job_id, attempt, message_id, RUNNING, worker, pid, sign)
    if r.set(key, mine, nx=True, ex=ttl_s):
        return
    held = r.get(key)
    current = json.loads(held) if held else {}
    if current.get("message") == message_id and current.get("state") == RUNNING:
        # Our own message, redelivered after its worker was lost: now ours.
        r.set(key, mine, xx=True, keepttl=True)
        return
    if current.get("message") == message_id and current.get("state") == DONE:
        # Our own message, redelivered after its worker had answered (and died before the ack).
        raise AlreadyAnswered(job_id, attempt)
    raise Replayed(job_id, attempt)


def holders(r: redis.Redis, attempts: list[tuple[str, int]]) -> list[dict[str, Any] | None]:
    """The claim of each (job id, attempt): message, state, worker, pid and signature, or None.

    Anything that is not a JSON object reads as no claim: whoever wrote it, it decides nothing.
    """
    if not attempts:
        return []
    raw = r.mget([_key(job_id, attempt) for job_id, attempt in attempts])
    return [_parse(v) for v in raw]


def _parse(value: bytes | str | None) -> dict[str, Any] | None:
    try:
        doc = json.loads(value) if value else None
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def finish(r: redis.Redis, job_id: str, attempt: int, message_id: str, worker: str = "", pid: int = 0,
           sign: Sign | None = None) -> None:
    """Mark an attempt finished so a later delivery of it is refused."""
    r.set(_key(job_id, attempt), _doc(job_id, attempt, message_id, DONE, worker, pid, sign), xx=True, keepttl=True)
