"""The embedded Valkey dies with the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.processes import ROOT
from tests.stack import free_port

STARTER = """
import sys
from llama_tasks import redis_server
server = redis_server.start_embedded(port=int(sys.argv[1]))
print(server._process.pid, flush=True)
sys.stdin.read()  # until killed
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_a_sigkilled_starter_takes_its_embedded_valkey_with_it() -> None:
    port = free_port()
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(port)], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert starter.stdout is not None
    valkey = int(starter.stdout.readline())
    assert alive(valkey)
    starter.send_signal(signal.SIGKILL)
    starter.wait()
    deadline = time.monotonic() + 15
    while alive(valkey) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not alive(valkey), "the embedded Valkey outlived the process that started it"
