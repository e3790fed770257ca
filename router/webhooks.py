"""Signed webhooks: how a requester's HTTP endpoint receives responses.

Each POST carries ``X-Llamas-Signature: t=<unix seconds>,v1=<hex>`` where
``v1`` is HMAC-SHA256 over ``"<t>.<body>"`` with the account's webhook secret,
and ``X-Llamas-Delivery: <job id>``. A receiver checks the signature, refuses
timestamps outside its tolerance, and refuses a delivery id it has seen.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
import urllib.error
import urllib.request
from collections.abc import MutableSet
from typing import Any

SIGNATURE_HEADER = "X-Llamas-Signature"
DELIVERY_HEADER = "X-Llamas-Delivery"
#: Receivers should refuse signatures older (or newer) than this.
DEFAULT_TOLERANCE_S = 300


class WebhookRejected(Exception):
    """Raised by ``verify`` when a webhook must not be trusted."""


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(
    secret: str,
    body: bytes,
    signature: str,
    delivery_id: str,
    seen: MutableSet[str],
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a received webhook and return its JSON body, or raise ``WebhookRejected``."""
    try:
        parts = dict(item.split("=", 1) for item in signature.split(","))
        timestamp = int(parts["t"])
        given = parts["v1"]
    except (ValueError, KeyError):
        raise WebhookRejected("malformed signature header") from None
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    if not hmac.compare_digest(given, expected):
        raise WebhookRejected("signature does not match")
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        raise WebhookRejected("timestamp outside tolerance")
    if delivery_id in seen:
        raise WebhookRejected(f"delivery {delivery_id} was already received")
    seen.add(delivery_id)
    return json.loads(body)


def post(url: str, secret: str, delivery_id: str, payload: dict[str, Any], timeout_s: float) -> int:
    """POST one signed delivery; returns the HTTP status (raises on network errors)."""
    body = json.dumps(payload, sort_keys=True).encode()
    request = urllib.request.Request(
        url,
        data=body,
        method="POST",
        headers={
            "Content-Type": "application/json",
            SIGNATURE_HEADER: sign(secret, body, int(time.time())),
            DELIVERY_HEADER: delivery_id,
            "User-Agent": "llamas-webhook/1",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as reply:
            return int(reply.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
