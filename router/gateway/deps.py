"""What a route needs, as FastAPI dependencies: the herder's service, the async Redis client, the API key.

All of it hangs off ``app.state`` (filled by ``install``) rather than module
globals or closures, so several apps in one process (the tests build one per
service) never share a service or a Redis client.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Annotated

import redis.asyncio as aioredis
from fastapi import Depends, FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from router.core import ledger
from router.core.errors import UnknownAccount
from router.core.service import HerderService

#: Builds (or returns) the service a gateway serves.
ServiceFactory = Callable[[], HerderService]


def install(app: FastAPI, service_factory: ServiceFactory) -> None:
    """Give ``app`` its service factory and a slot for its Redis client (made on first use)."""
    app.state.service_factory = service_factory
    app.state.redis = None


def service_of(app: FastAPI) -> HerderService:
    """The service ``app`` serves (its factory's)."""
    factory: ServiceFactory = app.state.service_factory
    return factory()


def redis_of(app: FastAPI) -> aioredis.Redis:
    """``app``'s async Redis client, made on first use (making one connects to nothing)."""
    if app.state.redis is None:
        app.state.redis = aioredis.Redis.from_url(service_of(app).settings.redis_url)
    client: aioredis.Redis = app.state.redis
    return client


# The dependencies are coroutines so that FastAPI runs them on the event loop
# (it would send a plain function to its thread pool), as the routes' own code.

async def get_service(request: Request) -> HerderService:
    return service_of(request.app)


async def get_redis(request: Request) -> aioredis.Redis:
    return redis_of(request.app)


async def api_key(request: Request) -> str:
    """The requester's Bearer API key; ``UnknownAccount`` (401) when there is none."""
    auth = request.headers.get("authorization", "")
    scheme, _, key = auth.partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise UnknownAccount("(no Bearer API key)")
    return key.strip()


def _check_account(svc: HerderService, key: str) -> None:
    with svc.read_sessions.begin() as session:
        ledger.account_by_key(session, key)


async def account_key(request: Request) -> str:
    """The Bearer API key of an account; ``UnknownAccount`` (401) otherwise.

    A route that reads a body names this before the body, so a request without
    a good key is refused before a byte of its body is read.
    """
    key = await api_key(request)
    await run_in_threadpool(_check_account, service_of(request.app), key)
    return key


Service = Annotated[HerderService, Depends(get_service)]
AsyncRedis = Annotated[aioredis.Redis, Depends(get_redis)]
ApiKey = Annotated[str, Depends(api_key)]
AccountKey = Annotated[str, Depends(account_key)]


def is_admin_key(svc: HerderService, given: str) -> bool:
    """Whether ``given`` is the admin key (``LLAMAS_ADMIN_KEY``); never true when none is set."""
    admin_key = svc.settings.admin_key
    return bool(admin_key) and hmac.compare_digest(given.encode(), admin_key.encode())
