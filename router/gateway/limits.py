"""What the gateway agrees to read: a body's length (ASGI middleware), a JSON body's shape and its numbers.

The length is checked before any route runs and before a byte is read: a
declared ``Content-Length`` over ``LLAMAS_MAX_BODY_BYTES`` is refused at once,
and a chunked body is counted as it arrives and cut off at the limit. The
shape (nesting depth, longest string) is checked by a scan of the raw bytes
before ``json`` parses them, since the parser recurses once per level and
builds every string whole. Integers longer than ``MAX_INT_DIGITS`` and
numbers past a float's range are refused as they are parsed: no field of any
request holds them, and Python refuses to convert the longest ones at all.
"""

from __future__ import annotations

import json
import math
import re
from itertools import accumulate
from typing import Any

from router.core.errors import BodyTooComplex, BodyTooLarge, MalformedBody, NumberOutOfRange
from router.core.request import MAX_INT_DIGITS
from router.core.settings import HerderSettings
from router.gateway.deps import service_of
from router.gateway.errors import error_body

#: A JSON string literal, escapes included. One left unclosed runs to the end of the body
#: (where ``json`` refuses it): a match that could fail would be tried again from every
#: escaped quote inside it, quadratic in the body's length.
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\\?\Z)', re.DOTALL)
#: Bytes → nesting change: openers +1, closers -1 (as a signed byte), everything else deleted.
_DEPTH_TABLE = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[{]}")


def check_shape(raw: bytes, max_depth: int, max_string_bytes: int) -> None:
    """Refuse a body that nests deeper than ``max_depth`` or holds a string longer than ``max_string_bytes``."""
    strings = _STRING.findall(raw)
    longest = max(map(len, strings), default=0) - 2
    if longest > max_string_bytes:
        raise BodyTooComplex("longest string", f"{longest} bytes", f"{max_string_bytes} bytes")
    # Brackets inside strings do not nest; the running sum of the rest bounds the parser's recursion.
    brackets = _STRING.sub(b"", raw).translate(_DEPTH_TABLE, _NOT_BRACKETS)
    depth = max(accumulate(memoryview(brackets).cast("b")), default=0)
    if depth > max_depth:
        raise BodyTooComplex("nesting depth", str(depth), str(max_depth))


def _parse_int(digits: str) -> int:
    if len(digits.lstrip("-")) > MAX_INT_DIGITS:
        raise NumberOutOfRange(f"an integer of {len(digits.lstrip('-'))} digits (at most {MAX_INT_DIGITS})")
    return int(digits)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise NumberOutOfRange(f"{text[:40]} does not fit a finite number")
    return value


def parse_json(raw: bytes, settings: HerderSettings) -> Any:
    """A body's JSON value, its shape and numbers checked; ``MalformedBody`` (or a subclass) otherwise."""
    check_shape(raw, settings.max_json_depth, settings.max_json_string_bytes)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedBody(f"the body is not valid UTF-8 (byte {exc.start})") from None
    try:
        # ``NaN`` and ``Infinity`` pass here, so the field that holds one is named when it is refused.
        return json.loads(text, parse_int=_parse_int, parse_float=_parse_float)
    except json.JSONDecodeError as exc:
        raise MalformedBody(f"the body is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:  # only below a depth limit set past Python's recursion limit
        raise BodyTooComplex("nesting depth", "too deep to parse", str(settings.max_json_depth)) from None


def _declared_length(scope: dict[str, Any]) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _send_refusal(send: Any, limit: int) -> None:
    status, body, _ = error_body(BodyTooLarge(limit))
    payload = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,  # closed: the rest is never read
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": payload})


class BodyLimit:
    """ASGI middleware: a request body over ``LLAMAS_MAX_BODY_BYTES`` is answered 413 and never read whole.

    Pure ASGI (not Starlette's ``BaseHTTPMiddleware``, which would buffer what
    it wraps). Past the limit the route is told its client disconnected, and
    whatever it then answers is dropped: the client has its 413. Any answer
    sent before the body was read to its end (a 401 for a missing key) closes
    the connection, so the server does not read the rest only to discard it.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = service_of(scope["app"]).settings.max_body_bytes
        declared = _declared_length(scope)
        if declared is not None and declared > limit:
            await _send_refusal(send, limit)
            return
        received, refused, started = 0, False, False
        unread = declared != 0 and scope.get("method") not in ("GET", "HEAD")

        async def counted_receive() -> dict[str, Any]:
            nonlocal received, refused, unread
            if refused:
                return {"type": "http.disconnect"}
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                unread = bool(message.get("more_body"))
                received += len(message.get("body", b""))
                if received > limit:
                    refused = True
                    if not started:
                        await _send_refusal(send, limit)
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            nonlocal started
            if refused:
                return
            if message["type"] == "http.response.start":
                started = True
                if unread:
                    message = {**message, "headers": [*message.get("headers", ()), (b"connection", b"close")]}
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # The route failed on the body it was refused (a "disconnect"); the 413 is already sent.
