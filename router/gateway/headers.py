"""Security headers on every response: the dashboard and the docs load only the package's own files, in no frame.

Every script of either page is a file under ``/static`` (none inline), so
the policy allows scripts from the gateway alone. Styles allow inline
attributes because Swagger UI and Chart.js set them; images allow ``data:``
URLs, which Swagger UI's icons are. The headers go on API answers too: they
cost nothing there, and a browser that opens one directly gets the same rules.
"""

from __future__ import annotations

from typing import Any

#: What a page of the gateway may load, and who may frame it (nobody).
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

#: Header name → value, added to every response that does not set its own.
SECURITY_HEADERS: dict[bytes, bytes] = {
    b"content-security-policy": CONTENT_SECURITY_POLICY.encode(),
    b"x-frame-options": b"DENY",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
}


class SecurityHeaders:
    """ASGI middleware adding ``SECURITY_HEADERS`` to each response's start."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS.items() if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)
