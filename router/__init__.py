"""The herder: fees, ledger, fee-market queue, dispatch, settlement, forwarding.

``celery -A router worker -Q herder -B`` runs it (the Celery app lives in
``router.herder.app``); ``from router import Herder`` is the Python client.
One subpackage a deliverable: ``core`` (money and jobs), ``herder`` (the
Celery process), ``gateway`` (HTTP), ``cli`` and ``local`` (``llamas up``);
imports flow toward ``core`` only (``tests/test_layers.py``).

Nothing is imported here eagerly: a requester that imports the client, or a
tool that imports ``router.core.fees``, must not build the herder's Celery app.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from celery import Celery

    from router.client import Herder, JobHandle

__all__ = ["app", "Herder", "JobHandle"]


def __getattr__(name: str) -> Any:
    # ``celery -A router`` looks up ``router.app``: the herder's app, with its tasks.
    if name == "app":
        from router.herder import tasks

        app: Celery = tasks.app
        return app
    if name in ("Herder", "JobHandle"):
        from router import client

        return getattr(client, name)
    raise AttributeError(f"module 'router' has no attribute {name!r}")
