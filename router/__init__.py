"""The herder: fees, ledger, fee-market queue, dispatch, settlement, forwarding.

``celery -A router worker -Q herder -B`` runs it; ``from router import Herder``
is the Python client.
"""

from router.app import app
from router import tasks as _tasks  # noqa: F401  (registers the tasks)
from router.client import Herder, JobHandle

__all__ = ["app", "Herder", "JobHandle"]
