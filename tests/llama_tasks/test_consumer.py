"""A worker whose lost broker connection cannot be closed keeps running.

In the Redis-outage chaos run, Celery 5.7's consumer collected the lost
connection, then closed it, and the close raised ``AttributeError`` ("'NoneType'
object has no attribute 'hostname'": restoring unacknowledged messages through
the transport collecting had detached), which stopped the worker as an
unrecoverable error. It depends on timing and does not reproduce in isolation
against a live or a stopped Redis, so here the connection's ``close`` fails
that way on purpose; the rest of Celery's handler runs as it is.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery
from celery.worker.consumer import Consumer as CeleryConsumer
from celery.worker.state import active_requests

from llama_tasks.consumer import Consumer

FAILURE = "'NoneType' object has no attribute 'hostname'"


class _LostConnection:
    """A broker connection that is gone: collecting works, closing fails as in the chaos run."""

    connection_errors: tuple[type[BaseException], ...] = (ConnectionError,)
    channel_errors: tuple[type[BaseException], ...] = ()

    def collect(self, socket_timeout: float | None = None) -> None:
        pass

    def close(self) -> None:
        raise AttributeError(FAILURE)


def consumer(cls: type, app: Celery) -> Any:
    """A consumer with only what losing its connection touches: the app, the connection, no pool."""
    c = cls.__new__(cls)
    c.app, c.connection, c.pool = app, _LostConnection(), None
    return c


@pytest.fixture
def app() -> Celery:
    app = Celery("consumer-test")
    app.conf.worker_cancel_long_running_tasks_on_connection_loss = True
    # The prefetch bookkeeping after a reconnect needs a started consumer; not what is tested here.
    app.conf.worker_enable_prefetch_count_reduction = False
    return app


def test_celerys_own_consumer_dies_when_the_close_fails(app: Celery) -> None:
    with pytest.raises(AttributeError, match="hostname"):
        CeleryConsumer.on_connection_error_after_connected(consumer(CeleryConsumer, app), ConnectionError("lost"))


def test_ours_drops_the_connection_and_goes_on(app: Celery) -> None:
    ours = consumer(Consumer, app)
    ours.on_connection_error_after_connected(ConnectionError("lost"))
    assert ours.connection is None


class _Running:
    """An acks-late request in progress, as ``active_requests`` holds it; its cancel may fail."""

    def __init__(self, fails: bool) -> None:
        self.task, self.acknowledged, self.fails, self.cancelled_with = _AcksLate(), False, fails, []

    def cancel(self, pool: Any) -> None:
        self.cancelled_with.append(pool)
        if self.fails:
            raise RuntimeError("the pool is gone")


class _AcksLate:
    acks_late = True


def test_ours_cancels_running_late_acked_jobs_once_and_survives_one_that_cannot_be(app: Celery) -> None:
    stuck, running = _Running(fails=True), _Running(fails=False)
    active_requests.update((stuck, running))
    try:
        consumer(Consumer, app).on_connection_error_after_connected(ConnectionError("lost"))
    finally:
        active_requests.difference_update((stuck, running))
    assert stuck.cancelled_with == [None] and running.cancelled_with == [None]


def test_every_llamas_app_runs_it() -> None:
    from agent.app import app as agent_app
    from llama_tasks.celery import app as worker_app
    from router.herder.app import app as herder_app

    for each in (worker_app, herder_app, agent_app):
        assert each.conf.worker_consumer == "llama_tasks.consumer:Consumer", each.main
