"""The herder's side of broker users: bindings declared, every stored user applied to Redis.

Run when a herder starts and every minute (``router.broker_users``): after a
Redis restart (without a saved ACL file) the users and kombu's binding tables
are gone, and the restricted roles can create neither themselves.
"""

from __future__ import annotations

import logging

import redis
from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from llama_tasks.registry import load_registry
from llama_tasks.settings import queue_for
from router.core import broker_access
from router.core.settings import HERDER_QUEUE, HerderSettings

log = logging.getLogger(__name__)


def queues(settings: HerderSettings) -> list[str]:
    """The queues restricted roles use: the herder's, and every registered model's."""
    return [HERDER_QUEUE, *(queue_for(name) for name in sorted(load_registry(settings.models_file)))]


def sync(settings: HerderSettings, app: Celery, sessions: sessionmaker[Session], r: redis.Redis) -> int:
    """Declare the queues' bindings and apply every stored broker user; returns the users applied."""
    with app.connection_for_write() as conn:
        broker_access.declare_queues(conn.default_channel, queues(settings))
    with sessions.begin() as session:
        try:
            return broker_access.sync(session, r)
        except redis.ResponseError as exc:
            # A server without ACL users (Redis < 7): nothing to apply; say so once a minute.
            log.error("broker users not applied: %s", exc)
            return 0
