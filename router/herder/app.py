"""The herder's Celery application: ``celery -A router worker -Q herder -B``.

Beat runs ``router.tick`` every ``LLAMAS_TICK_S`` (deadlines, leases,
dispatch), ``router.erase_text`` every minute (text past its retention,
``router.core.retention``) and ``router.broker_users`` every minute (Redis
ACL users and bindings, ``router.herder.broker_users``); everything else is driven by requests and worker results. The
main process refuses to start without the signing key, before it forks.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

from celery import Celery
from celery.signals import beat_init, worker_init

from llama_tasks import lifeline
from router.core import private_files, retention
from router.core.preflight import herder_problem
from router.core.settings import HERDER_QUEUE, get_settings

#: How often the herder re-applies broker users and bindings (``router.herder.broker_users``).
BROKER_USERS_EVERY_S = 60.0

app = Celery("router")
app.config_from_object("celeryconfig")
app.conf.task_default_queue = HERDER_QUEUE
app.conf.task_routes = {"router.*": {"queue": HERDER_QUEUE}}
# A herder task takes milliseconds: a STARTED state in the result store would
# cost a write per task and tell a waiting requester nothing.
app.conf.task_track_started = False
app.conf.beat_schedule = {
    "llamas-tick": {
        "task": "router.tick",
        "schedule": get_settings().tick_s,
        # A tick that waited longer than a few periods is stale: the next one covers it.
        "options": {"expires": get_settings().tick_s * 5},
    },
    "llamas-broker-users": {
        "task": "router.broker_users",
        "schedule": BROKER_USERS_EVERY_S,
        "options": {"expires": BROKER_USERS_EVERY_S},
    },
    "llamas-erase-text": {
        "task": "router.erase_text",
        "schedule": retention.ERASE_EVERY_S,
        "options": {"expires": retention.ERASE_EVERY_S},
    },
}

# The embedded beat dies with the herder's main process (Celery does the same
# for pool children): an orphaned beat would keep sending ticks beside a
# restarted herder's.
lifeline.connect_celery_signals()


@beat_init.connect
def _quiet_beat(sender: Any = None, **_: Any) -> None:
    """No task-sent events from beat: it sends only housekeeping (tick, erasure), which Flower need not list."""
    # A beat in its own process (``-B``'s default, or ``celery beat``) only; a
    # beat run as a thread shares the herder's configuration, whose dispatches
    # Flower should see as sent.
    ours = getattr(sender, "app", None) is app
    if ours and threading.current_thread() is threading.main_thread():
        app.conf.task_send_sent_event = False


@worker_init.connect
def _check_before_fork(sender: Any = None, **_: Any) -> None:
    # Signals are process-global: only a worker started for this app is a herder.
    if getattr(sender, "app", None) is not app:
        return
    # The beat's schedule, the ledger and anything else this herder writes
    # in its home are for the service's user alone (pool children and the
    # embedded beat inherit the umask); an older home left open is closed.
    private_files.restrict_umask()
    private_files.secure_home(get_settings().home)
    problem = herder_problem(get_settings())
    if problem is not None:
        # SystemExit passes through Celery's signal dispatch (an ordinary
        # exception would be logged and the worker started anyway).
        print(f"llamas herder refuses to start: {problem}", file=sys.stderr)
        raise SystemExit(2)
