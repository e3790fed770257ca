"""What the herder, the gateway and the CLI check before they start.

The herder and the gateway sign envelopes with the herder's private key, and
check the house's workers' results against the house's public key.
Without them they would start, look healthy and then fail inside every
request; instead each refuses to start with one line that says how to make
the key. The gateway and the CLI also need Redis to answer: without it every
request would fail after Celery's reconnection retries.
"""

from __future__ import annotations

from typing import Any

from kombu.utils.url import maybe_sanitize_url

from llama_tasks import redis_server, signing
from llama_tasks.errors import LlamasError
from router.core.settings import HerderSettings, get_settings


def herder_problem(settings: HerderSettings) -> str | None:
    """Why a herder or gateway cannot serve with ``settings``; None when it can."""
    key_file = settings.private_key_file
    if not key_file.exists():
        return (f"no signing key at {key_file}; make one with `llamas keys generate` "
                "(or run `llamas up`, which makes it)")
    try:
        signing.load_private(key_file)
    except (OSError, ValueError, TypeError) as exc:
        return f"the signing key {key_file} cannot be used ({exc}); replace it with `llamas keys generate --force`"
    house = settings.house_public_key_file
    try:
        signing.load_public("", house)
    except (OSError, ValueError, TypeError, LlamasError):
        return (f"no usable house public key at {house} (the house's workers sign their results with its "
                "private half); make the pair with `llamas keys generate` (or run `llamas up`, which makes it)")
    return None


def broker_problem(settings: HerderSettings) -> str | None:
    """Why Redis cannot be used; None when it answers."""
    if redis_server.answers(settings.redis_url):
        return None
    return (f"Redis at {maybe_sanitize_url(settings.redis_url)} does not answer; start it, or run `llamas up` "
            "(which starts an embedded one on the default address)")


def gateway_problem(settings: HerderSettings) -> str | None:
    """Why the HTTP gateway cannot serve; None when it can."""
    return herder_problem(settings) or broker_problem(settings)


class GatewayPreflight:
    """ASGI middleware that fails the gateway's start-up, in one line, when ``gateway_problem`` finds one.

    At start-up rather than at import, so importing the gateway checks
    nothing; by answering ``lifespan.startup.failed`` itself rather than by
    raising, so uvicorn prints the line instead of a traceback.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        problem = gateway_problem(get_settings()) if scope["type"] == "lifespan" else None
        if problem is None:
            await self.app(scope, receive, send)
            return
        await receive()  # lifespan.startup, the first message of every lifespan
        await send({"type": "lifespan.startup.failed", "message": f"llamas gateway refuses to start: {problem}"})
