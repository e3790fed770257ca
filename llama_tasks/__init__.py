"""Inference workers: ``celery -A llama_tasks worker -Q llama.<model>``.

The Celery app lives in ``llama_tasks.celery`` and is built only when asked
for: the herder and the client import this package's protocol modules
(jobs, signing, keys) without starting a worker's machinery.
"""

from __future__ import annotations

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    # ``celery -A llama_tasks`` looks up ``llama_tasks.app``: the worker's app, with its task.
    if name == "app":
        from llama_tasks import tasks

        return tasks.app
    raise AttributeError(f"module 'llama_tasks' has no attribute {name!r}")
