"""The herder's Celery application: ``celery -A router worker -Q herder -B``.

Beat runs ``router.tick`` every ``LLAMAS_TICK_S`` (deadlines, leases,
dispatch); everything else is driven by requests and worker results.
"""

from __future__ import annotations

from celery import Celery

from router.settings import HERDER_QUEUE, get_settings

app = Celery("router")
app.config_from_object("celeryconfig")
app.conf.task_default_queue = HERDER_QUEUE
app.conf.task_routes = {"router.*": {"queue": HERDER_QUEUE}}
app.conf.beat_schedule = {
    "llamas-tick": {
        "task": "router.tick",
        "schedule": get_settings().tick_s,
        # A tick that waited longer than a few periods is stale: the next one covers it.
        "options": {"expires": get_settings().tick_s * 5},
    }
}
