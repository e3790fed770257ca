"""Wire a process's herder from its settings: the only place that does the I/O
of starting one (migrating the ledger, loading the signing key and the token
counter's registry, connecting Celery and Redis).
"""

from __future__ import annotations

import redis
from celery import Celery

from llama_tasks import signing
from router.core.db import open_ledger
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.herder.herd import HerdReader
from router.herder.tokens import TokenCounter
from router.herder.transport import CeleryForwarder, CeleryTransport


def build(settings: HerderSettings, app: Celery) -> HerderService:
    """A service on the real ledger, Redis and Celery ``app`` (``router.herder.stub`` builds in-process ones)."""
    sessions, read_sessions = open_ledger(settings.ledger_url, settings.sqlite_synchronous)
    r = redis.Redis.from_url(settings.redis_url)
    return HerderService(
        settings,
        sessions=sessions,
        read_sessions=read_sessions,
        counter=TokenCounter(settings.models_file, settings.grammar_step_budget_ms / 1000),
        key=signing.load_private(settings.private_key_file),
        redis_client=r,
        transport=CeleryTransport(app),
        forwarder=CeleryForwarder(app, r, settings.response_ttl_s),
        herd=HerdReader(r),
        house_key=signing.load_public("", settings.house_public_key_file),
    )
