"""Waiting on a job the gateway admitted: its final response, its token stream, and cancelling it when the client leaves.

Redis brings the response and the tokens; when Redis is away the job goes on
regardless, and the ledger says when it has ended.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import anyio
import redis
import redis.asyncio as aioredis
from fastapi import Request
from fastapi.concurrency import run_in_threadpool

from llama_tasks import stream as token_stream
from router.core.errors import JobNotQueued, UnknownJob
from router.core.keys import NOTIFY_PREFIX, RESPONSE_PREFIX
from router.core.service import HerderService

#: How long one wait on a token stream blocks before the gateway checks that its client is still there.
FOLLOW_BLOCK_MS = 250
#: Pause between tries while Redis does not answer.
REDIS_RETRY_S = 0.5
#: How long one wait for the job's "response ready" notice blocks, in seconds.
NOTIFY_BLOCK_S = 0.5


@dataclass(frozen=True)
class AdmittedJob:
    """A job as the HTTP request that admitted it waits for it."""

    request: Request
    svc: HerderService
    r: aioredis.Redis
    key: str
    job_id: str

    async def cancel_on_disconnect(self) -> None:
        """Nobody is listening any more: a queued job ends with a full refund, a
        running one stops at its next step and is charged for what it generated."""
        try:
            await run_in_threadpool(self.svc.cancel, self.key, self.job_id)
        except (JobNotQueued, UnknownJob):
            pass  # already finished
        except redis.RedisError:
            pass  # cancelled in the ledger; only telling the job's other channels failed

    async def final_from_ledger(self) -> dict[str, Any] | None:
        """The job's response if the ledger says it has ended (Redis may have lost it, or be away)."""
        doc = await run_in_threadpool(self.svc.status, self.key, self.job_id)
        return cast(dict[str, Any] | None, doc.get("response"))

    async def wait_response(self) -> dict[str, Any] | None:
        """The final response, or None if the client went away (its queued job is cancelled)."""
        while True:
            try:
                raw = await self.r.get(RESPONSE_PREFIX + self.job_id)
                if raw:
                    return cast(dict[str, Any], json.loads(raw))
            except redis.RedisError:
                # Redis is away: the job goes on (and is charged) regardless, and the
                # ledger knows when it ends, so keep waiting rather than fail the client.
                final = await self.final_from_ledger()
                if final is not None:
                    return final
                await anyio.sleep(REDIS_RETRY_S)
            if await self.request.is_disconnected():
                await self.cancel_on_disconnect()
                return None
            try:
                await self.r.blpop([NOTIFY_PREFIX + self.job_id], timeout=NOTIFY_BLOCK_S)
            except redis.RedisError:
                await anyio.sleep(REDIS_RETRY_S)

    async def follow(self) -> AsyncIterator[token_stream.Shown]:
        """The job's stream as a reader should see it, every choice's; ends early if the client goes away."""
        last, follower = "0-0", token_stream.ChoicesFollower()
        while True:
            try:
                batch = cast(list[Any], await self.r.xread({token_stream.key(self.job_id): last},
                                                           block=FOLLOW_BLOCK_MS, count=100))
            except redis.RedisError:
                # Redis is away (or restarted empty): stop streaming; the caller
                # then waits for the final response, from the ledger if need be.
                return
            for entry_id, raw in (batch[0][1] if batch else []):
                last = entry_id
                for event in follower.feed({k.decode(): v.decode() for k, v in raw.items()}):
                    yield event
                    if event["event"] in ("end", "error"):
                        return
            if not batch:
                if await self.request.is_disconnected():
                    yield {"event": "disconnected"}
                    return
                # Nothing new: the job may have ended without generating (expired, cancelled).
                if await self.r.exists(RESPONSE_PREFIX + self.job_id):
                    return
