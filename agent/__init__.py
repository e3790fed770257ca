"""The example agent: ``celery -A agent worker -Q agent -B``.

A requester of the service that grades a chat room's sentiment and trades on
it, and a chatbot that answers whoever speaks in its room.

``app`` is imported on first use, not with the package: the ``llamas world``
and ``llamas agent`` commands import ``agent.cli`` and must not build the
agent's Celery app (or refuse to run over an agent setting they do not use).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from agent.app import app

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    # Celery's `-A agent` looks up `agent.app` as an attribute, which lands here.
    if name == "app":
        from agent.app import app

        return app
    raise AttributeError(f"module 'agent' has no attribute {name!r}")
