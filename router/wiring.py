"""Wire a process's herder from its settings: the only place that does the I/O
of starting one (migrating the ledger, loading the signing key and the token
counter's registry, connecting Celery and Redis).
"""

from __future__ import annotations

import redis
from celery import Celery

from llama_tasks import signing
from router.db import make_engine, make_read_sessionmaker, make_sessionmaker, upgrade
from router.herd import HerdReader
from router.parts import Forwarder, Transport
from router.service import HerderService
from router.settings import HerderSettings
from router.tokens import TokenCounter
from router.transport import CeleryForwarder, CeleryTransport


def build(settings: HerderSettings, app: Celery, *, transport: Transport | None = None,
          forwarder: Forwarder | None = None) -> HerderService:
    """A service on the real ledger, Redis and Celery ``app``; ``transport`` and
    ``forwarder`` replace the Celery ones (tests, embedding programs)."""
    upgrade(settings.ledger_url)
    r = redis.Redis.from_url(settings.redis_url)
    engine = make_engine(settings.ledger_url, settings.sqlite_synchronous)
    return HerderService(
        settings,
        sessions=make_sessionmaker(engine),
        read_sessions=make_read_sessionmaker(engine),
        counter=TokenCounter(settings.models_file),
        key=signing.load_private(settings.private_key_file),
        redis_client=r,
        transport=transport or CeleryTransport(app),
        forwarder=forwarder or CeleryForwarder(app, r, settings.response_ttl_s),
        herd=HerdReader(r),
    )
