"""uvicorn's h11 HTTP protocol with a deadline on each request's headers (against slowloris).

uvicorn (checked up to 0.55) times only the idle gap between two requests
(``timeout_keep_alive``, armed when a response completes and cancelled by
the next byte): a connection's first request, and any request whose first
byte has arrived, may take forever over its headers, so a client that
trickles a header a byte at a time holds a connection (and its memory) for
as long as it likes. ``limit_concurrency`` does not help: it counts only
when a request's headers are complete, and then refuses honest requests.

This protocol closes a connection whose request has not finished its headers
``HEADER_TIMEOUT_S`` after the connection opened or the request's first
byte arrived, however the bytes trickle in. The body and the response are
not timed here: a streamed completion may run for minutes. Serve with
``uvicorn router.api:app --http router.gateway.http_protocol:HeaderTimeoutH11Protocol``
(``HTTP_PROTOCOL``), as ``llamas up`` does.
"""

from __future__ import annotations

import asyncio

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: What to give uvicorn's ``--http`` to serve with this protocol.
HTTP_PROTOCOL = f"{__name__}:HeaderTimeoutH11Protocol"
#: Longest a request's headers may take to arrive (seconds), from the connection's opening or
#: the request's first byte. Headers are a few hundred bytes: an honest client sends them at once.
HEADER_TIMEOUT_S = 10.0


class HeaderTimeoutH11Protocol(H11Protocol):
    """``H11Protocol`` that closes a connection whose request headers take longer than ``header_timeout_s``."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    _header_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._watch_headers()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_watching()
        super().connection_lost(exc)

    def _watch_headers(self) -> None:
        """Keep the deadline armed while a request's headers are incomplete, and only then."""
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            self._stop_watching()
        elif self._header_deadline is None and self.timeout_keep_alive_task is None:
            # Armed once per request: further bytes do not extend it. Between requests
            # (nothing received yet) uvicorn's keep-alive timer is the one that runs.
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _stop_watching(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        self.logger.info("closed a connection whose request headers took over %.0f s", self.header_timeout_s)
        try:
            self.conn.send(h11.ConnectionClosed())
        except h11.LocalProtocolError:  # h11 already saw the connection end: only the socket is left
            pass
        self.transport.close()
