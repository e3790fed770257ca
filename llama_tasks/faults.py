"""Crash points: where a test may kill a worker or a herder, deterministically.

The life of a request is marked at each point where a process can die with
work half done (``POINTS``). A test that starts a process with
``LLAMAS_TEST_CRASH_AT=<point>`` and ``LLAMAS_TEST_CRASH_MARKER=<file>``
has that process SIGKILL itself the first time any of its threads reaches
the point: the marker file is created then (it holds the time of the crash),
and a process that finds it already there carries on, so the component
started again with the same environment does not crash again. Without both
variables (as in every real deployment) ``point`` is one dictionary lookup.

The kill takes the whole component when it runs in a session of its own (a
Celery worker's main process and its pool, as a crash or the OOM killer of
a container would), else the calling process alone.
"""

from __future__ import annotations

import os
import signal
import time

CRASH_AT_ENV = "LLAMAS_TEST_CRASH_AT"
CRASH_MARKER_ENV = "LLAMAS_TEST_CRASH_MARKER"

#: Every crash point, in the order a request meets them, with where it is.
POINTS = {
    # The herder (the gateway runs the same code for its own admissions).
    "admitted": "after an admission (and the dispatch claim of a free slot) committed, before the message is sent",
    "claimed": "after the tick's dispatch claim committed, before the message is sent",
    "sent": "after a generation message was sent, before it was recorded as sent",
    # The worker.
    "started": "after the worker claimed the attempt, before its first token",
    "first_token": "after the first token was streamed",
    "generated": "after the generation ended, before its result was published",
    "published": "after the result was published, before the attempt's claim was marked finished",
    "finished": "after the claim was marked finished, before the task returned (and its message was acked)",
    # The herder again.
    "settled": "after a settlement committed, before the response was delivered",
    "delivered": "after the response was delivered, before the delivery was recorded",
    "marked": "after the delivery was recorded",
}


def point(name: str) -> None:
    """Die here if a test asked for it (see the module's docstring)."""
    if os.environ.get(CRASH_AT_ENV) != name:
        return
    marker = os.environ.get(CRASH_MARKER_ENV)
    if not marker:
        return
    try:
        fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return  # crashed here once already: this is the process started again
    os.write(fd, f"{time.time():.6f}".encode())
    os.close(fd)
    group = os.getpgid(0)
    if os.getsid(0) == group:
        os.killpg(group, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
