"""Inference workers: ``celery -A llama_tasks worker -Q llama.<model>``."""

from llama_tasks.app import app
from llama_tasks import tasks as _tasks  # noqa: F401  (registers the task)

__all__ = ["app"]
