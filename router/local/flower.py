"""Flower as ``llamas up`` and ``make flower`` run it: ``python -m router.local.flower [flower options]``.

It is ``celery -A llama_tasks flower`` with one change: ``/metrics`` asks for
the password like every other page. Flower 2 serves its Prometheus metrics
(each worker's name, every task's name, counts and run times) without
checking basic auth, whatever ``FLOWER_BASIC_AUTH`` says; here its handler
goes through Tornado's ``authenticated`` check, which applies Flower's basic
auth (a 401 with ``WWW-Authenticate`` without the right password).
``/healthcheck`` stays open: it says "OK" and nothing else.
"""

from __future__ import annotations

import sys
from typing import Any

#: The Celery app Flower watches: the workers', whose events every process sends.
FLOWER_APP = "llama_tasks"


def protect_metrics() -> None:
    """Make Flower's ``/metrics`` handler require the same login as its pages (idempotent)."""
    from flower.views import monitor
    from tornado import web

    handler: Any = monitor.Metrics
    if not getattr(handler.get, "_llamas_protected", False):
        protected: Any = web.authenticated(handler.get)
        protected._llamas_protected = True
        handler.get = protected


def main(argv: list[str] | None = None) -> None:
    """Run Flower on the workers' app with ``argv`` as its options, ``/metrics`` protected."""
    from celery.bin.celery import main as celery_main

    protect_metrics()
    sys.argv = ["celery", "-A", FLOWER_APP, "flower", *(sys.argv[1:] if argv is None else argv)]
    celery_main()


if __name__ == "__main__":
    main()
