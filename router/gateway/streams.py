"""Server-sent-event streams per key: at most ``LLAMAS_MAX_STREAMS_PER_KEY`` open at once on one gateway process.

A completion stream and a dashboard tab each hold a slot of their key from
before the work starts (a refused stream holds no money) until the response
ends, however it ends: finished, failed, or its client gone. Counted in the
process, so a slot is freed the moment its stream ends, never leaked by a
crash; several gateway processes each allow the limit.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from router.core.errors import TooManyStreams
from router.gateway.deps import service_of


class Slot:
    """One stream's hold on its key's share; ``release`` is idempotent."""

    def __init__(self, held: Counter[str], who: str) -> None:
        self._held, self._who, self._released = held, who, False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        self._held[self._who] -= 1
        if self._held[self._who] <= 0:
            del self._held[self._who]


def open_streams(app: FastAPI) -> Counter[str]:
    """``app``'s count of open streams by key (one per app: tests build several)."""
    held: Counter[str] | None = getattr(app.state, "open_streams", None)
    if held is None:
        held = app.state.open_streams = Counter()
    return held


def claim(app: FastAPI, who: str) -> Slot:
    """A slot for one more stream of ``who`` (a key's hash, or ``admin``); ``TooManyStreams`` (429) past the limit.

    Called on the event loop only, so counting needs no lock.
    """
    limit = service_of(app).settings.max_streams_per_key
    held = open_streams(app)
    if held[who] >= limit:
        raise TooManyStreams(limit)
    held[who] += 1
    return Slot(held, who)


class HeldStream(StreamingResponse):
    """A ``StreamingResponse`` that releases its ``Slot`` when the response ends, however it ends."""

    def __init__(self, content: Any, slot: Slot, **kwargs: Any) -> None:
        super().__init__(content, **kwargs)
        self.slot = slot

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.slot.release()
