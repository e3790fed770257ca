"""What ``test_header_timeout`` serves under uvicorn: an app that echoes the body, and the
gateway's HTTP protocol with a header deadline short enough to wait for."""

from __future__ import annotations

from typing import Any

from router.gateway.http_protocol import HeaderTimeoutH11Protocol


class QuickHeaders(HeaderTimeoutH11Protocol):
    """The gateway's protocol, with a one-second deadline on request headers."""

    header_timeout_s = 1.0


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """Answers ``got <body>``, once the whole body has arrived."""
    assert scope["type"] == "http"
    body, more = b"", True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    answer = b"got " + body
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(answer)).encode())]})
    await send({"type": "http.response.body", "body": answer})
