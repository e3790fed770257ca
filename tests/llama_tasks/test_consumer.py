"""A worker whose broker connection drops while a message is unacknowledged keeps running.

Celery 5.7 collects a lost connection and then closes it; closing restores
the unacknowledged messages through the transport that collecting detached,
and the ``AttributeError`` stops the worker. ``llama_tasks.consumer`` is the
consumer every llamas app runs; this drives both with a real kombu
connection to Redis holding one received, unacknowledged message.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import kombu
import pytest
from celery import Celery
from celery.worker.consumer import Consumer as CeleryConsumer

from llama_tasks.consumer import Consumer


@pytest.fixture
def unacknowledged(redis_url: str) -> Iterator[tuple[Celery, Any, kombu.Queue]]:
    """An app and its connection whose channel holds one message received and not acknowledged."""
    app = Celery("consumer-test", broker=redis_url)
    app.conf.worker_cancel_long_running_tasks_on_connection_loss = True
    connection = app.connection_for_read()
    queue = kombu.Queue(f"consumer-test-{uuid.uuid4().hex}")
    bound = queue(connection.default_channel)
    bound.declare()
    kombu.Producer(connection.default_channel).publish({"n": 1}, routing_key=queue.name, declare=[queue])
    message = bound.get(no_ack=False)
    assert message is not None and not message.acknowledged
    yield app, connection, queue
    with app.connection_for_write() as cleanup:
        queue(cleanup.default_channel).delete()


def consumer(cls: type, app: Celery, connection: Any) -> Any:
    """A consumer with only what losing its connection touches: the app, the connection and no pool."""
    c = cls.__new__(cls)
    c.app, c.connection, c.pool = app, connection, None
    return c


def test_celerys_own_consumer_dies_on_it(unacknowledged: tuple[Celery, Any, kombu.Queue]) -> None:
    app, connection, _ = unacknowledged
    with pytest.raises(AttributeError):
        CeleryConsumer.on_connection_error_after_connected(consumer(CeleryConsumer, app, connection),
                                                           ConnectionError("lost"))


def test_ours_drops_the_connection_and_goes_on(unacknowledged: tuple[Celery, Any, kombu.Queue]) -> None:
    app, connection, _ = unacknowledged
    ours = consumer(Consumer, app, connection)
    ours.on_connection_error_after_connected(ConnectionError("lost"))
    assert ours.connection is None


def test_every_llamas_app_runs_it() -> None:
    import celeryconfig

    assert celeryconfig.worker_consumer == "llama_tasks.consumer:Consumer"
