"""Server-sent-event streams per key: at most ``LLAMAS_MAX_STREAMS_PER_KEY`` open at once, over every gateway.

A completion stream and a dashboard tab each hold a slot of their key from
before the work starts (a refused stream holds no money) until the response
ends, however it ends: finished, failed, or its client gone. The slots are
entries of one Redis sorted set per key, shared by every gateway process: each
entry is a lease its gateway renews while the stream is open, so a gateway
that dies frees its streams' slots within ``LEASE_S``.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

import anyio
import redis
import redis.asyncio as aioredis
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from router.core.errors import TooManyStreams
from router.core.keys import STREAMS_PREFIX
from router.gateway.deps import redis_of, service_of

log = logging.getLogger(__name__)

#: How long a slot lasts unless its gateway renews it.
LEASE_S = 30.0
#: How often an open stream renews its slot.
RENEW_S = LEASE_S / 3

# Times come from Redis itself (TIME): gateways on hosts whose clocks differ agree on every lease.
_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) "
#: KEYS[1] the key's set; ARGV: lease ms, limit, member. 1 when the slot was taken, 0 when the key is full.
_CLAIM = _NOW + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[1]), ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return 1
"""
#: KEYS[1] the key's set; ARGV: lease ms, member. Renews the member's lease if it still holds one.
_RENEW = _NOW + """
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + tonumber(ARGV[1]), ARGV[2]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
end
return 1
"""


class Slot:
    """One stream's hold on its key's share: renewed while the stream is open; ``release`` is idempotent."""

    def __init__(self, r: aioredis.Redis, name: str, member: str) -> None:
        self._r, self._name, self._member, self._released = r, name, member, False

    async def keep_alive(self) -> None:
        """Renew the lease until cancelled (when the stream ends)."""
        while True:
            await anyio.sleep(RENEW_S)
            try:
                await self._r.eval(_RENEW, 1, self._name, int(LEASE_S * 1000), self._member)  # type: ignore[misc]
            except redis.RedisError as exc:  # the lease may lapse: the stream goes on, counted less
                log.warning("a stream's slot was not renewed: %s", type(exc).__name__)

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        # Shielded: it runs as a cancelled response unwinds, and must still reach Redis.
        with anyio.CancelScope(shield=True):
            try:
                await self._r.zrem(self._name, self._member)
            except redis.RedisError as exc:  # its lease expires on its own
                log.warning("a stream's slot was not released: %s", type(exc).__name__)


async def claim(app: FastAPI, who: str) -> Slot:
    """A slot for one more stream of ``who`` (a key's hash, or ``admin``); ``TooManyStreams`` (429) past the limit."""
    limit = service_of(app).settings.max_streams_per_key
    r = redis_of(app)
    name, member = STREAMS_PREFIX + who, uuid.uuid4().hex
    taken = await r.eval(_CLAIM, 1, name, int(LEASE_S * 1000), limit, member)  # type: ignore[misc]
    if not taken:
        raise TooManyStreams(limit)
    return Slot(r, name, member)


class HeldStream(StreamingResponse):
    """A ``StreamingResponse`` that keeps its ``Slot`` while it streams and releases it however it ends."""

    def __init__(self, content: Any, slot: Slot, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            async with anyio.create_task_group() as renewing:
                renewing.start_soon(self.slot.keep_alive)
                try:
                    await super().__call__(scope, receive, send)
                finally:
                    renewing.cancel_scope.cancel()
        finally:
            await self.slot.release()
