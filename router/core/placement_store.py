"""What demand placement keeps in Redis, shared by every herder: the lock that lets one herder place at a
time, the Inits on their way (so a worker is not moved twice before its heartbeat shows the first), and
the latest decisions, for the dashboard.

Nothing here is needed to rebuild the ledger: losing it costs at most one
tick's moves decided again.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from typing import Any

import redis

from router.core.keys import PLACEMENT_DECISIONS, PLACEMENT_LOCK, PLACEMENT_PENDING, PLACEMENT_WAITING
from router.core.placement import Move, Pending

#: Decisions kept for the dashboard.
KEEP_DECISIONS = 100
#: How long the last step's waiting models are shown without a newer step.
WAITING_TTL_S = 30
#: How long one herder may hold the placement lock: longer than a placement step takes, short enough
#: that a herder that died holding it stops nobody for long.
LOCK_MS = 5000

#: Deletes the lock only if it still holds this herder's token (it may have expired and been taken).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"


@contextmanager
def turn(r: redis.Redis, lock_ms: int = LOCK_MS) -> Iterator[bool]:
    """Take the placement lock for one step; yields whether this herder holds it."""
    token = secrets.token_hex(16)
    held = bool(r.set(PLACEMENT_LOCK, token, nx=True, px=lock_ms))
    try:
        yield held
    finally:
        if held:
            r.eval(_RELEASE, 1, PLACEMENT_LOCK, token)


def pending(r: redis.Redis, herd: list[dict[str, Any]], now: float) -> dict[str, Pending]:
    """The Inits still on their way, by worker; those a heartbeat now speaks for are forgotten."""
    found: dict[str, Pending] = {}
    done: list[str] = []
    for worker, raw in r.hgetall(PLACEMENT_PENDING).items():
        name = worker.decode() if isinstance(worker, bytes) else str(worker)
        try:
            item = Pending(**json.loads(raw))
        except (TypeError, ValueError):
            done.append(name)
            continue
        if item.settled(herd, now):
            done.append(name)
        else:
            found[name] = item
    if done:
        r.hdel(PLACEMENT_PENDING, *done)
    return found


def record(r: redis.Redis, move: Move, nonce: str, now: float) -> None:
    """Remember an Init sent for ``move`` until its worker's heartbeat shows it, and the decision."""
    item = Pending(worker=move.worker, model=move.to_model, nonce=nonce, at=now)
    pipe = r.pipeline()
    pipe.hset(PLACEMENT_PENDING, move.worker, json.dumps(asdict(item)))
    pipe.lpush(PLACEMENT_DECISIONS, json.dumps(move.to_doc(now) | {"nonce": nonce}))
    pipe.ltrim(PLACEMENT_DECISIONS, 0, KEEP_DECISIONS - 1)
    pipe.execute()


def decisions(r: redis.Redis, limit: int = KEEP_DECISIONS) -> list[dict[str, Any]]:
    """The latest decisions, newest first."""
    return [json.loads(raw) for raw in r.lrange(PLACEMENT_DECISIONS, 0, limit - 1)]


def note_waiting(r: redis.Redis, waiting: dict[str, str]) -> list[str]:
    """Keep why each short model gets no worker, for the dashboard; returns the models newly waiting."""
    before = r.get(PLACEMENT_WAITING)
    known = set(json.loads(before)) if before else set()
    r.set(PLACEMENT_WAITING, json.dumps(waiting), ex=WAITING_TTL_S)
    return sorted(set(waiting) - known)


def waiting(r: redis.Redis) -> dict[str, str]:
    """Model → why no worker moves to it, as the latest placement step saw it."""
    raw = r.get(PLACEMENT_WAITING)
    return dict(json.loads(raw)) if raw else {}
