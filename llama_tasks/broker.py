"""How an operator's worker uses the broker under its restricted Redis user.

An operator's credential (``router.core.broker_access``) may consume its model
queues and publish events, results and heartbeats, and nothing else. Celery's
defaults would reach further, and be refused with NOPERM:

- declaring a queue binds it to its exchange (a ``SADD`` to
  ``_kombu.binding.<exchange>``); a worker that could add a member there could
  bind a queue of its own and get a copy of every job. The herder declares
  the bindings; an operator's worker declares none.
- kombu keeps unacknowledged messages in one ``unacked`` hash for everyone;
  an operator's worker keeps its own (``llama_tasks.settings.unacked_keys``).
- remote control (the pidbox), mingle and gossip publish to, and bind queues
  on, exchanges every worker shares: an operator's worker takes part in none.

``LLAMAS_OPERATOR`` set is all it takes: ``llama_tasks.celery`` applies
``operator_conf`` then.
"""

from __future__ import annotations

from typing import Any

from celery.app.amqp import AMQP, Queues
from kombu import Queue

from llama_tasks.settings import unacked_keys

#: The consumer of an operator's worker (``llama_tasks.consumer``): no mingle, no gossip.
OPERATOR_CONSUMER = "llama_tasks.consumer:OperatorConsumer"


class UndeclaredQueues(Queues):  # type: ignore[misc]
    """Celery's queue table, every queue in it (``-Q``'s too) marked as declared by someone else."""

    def __setitem__(self, name: str, queue: Queue) -> None:
        queue.no_declare = True  # type: ignore[attr-defined]
        super().__setitem__(name, queue)


class OperatorAMQP(AMQP):  # type: ignore[misc]
    """Celery's AMQP layer for an operator's worker: it consumes and publishes, never declares."""

    queues_cls = UndeclaredQueues


def operator_conf(operator: str, transport_options: dict[str, Any]) -> dict[str, Any]:
    """The Celery settings an operator's worker runs with, over ``transport_options`` as configured."""
    return {
        "broker_transport_options": {**transport_options, **unacked_keys(operator)},
        # The house cannot inspect or shut down an operator's worker, nor the
        # operator reach the house's: cancellation goes through llamas:cancel:*.
        "worker_enable_remote_control": False,
        "worker_consumer": OPERATOR_CONSUMER,
    }
