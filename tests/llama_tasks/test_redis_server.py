"""The embedded Valkey dies with the process that started it."""

from __future__ import annotations

import signal
import subprocess
import sys

from tests.processes import ROOT, alive, wait_for
from tests.stack import free_port

STARTER = """
import sys
from llama_tasks import redis_server
server = redis_server.start_embedded(port=int(sys.argv[1]))
print(server._process.pid, flush=True)
sys.stdin.read()  # until killed
"""


def test_a_sigkilled_starter_takes_its_embedded_valkey_with_it() -> None:
    port = free_port()
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(port)], cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)
    assert starter.stdout is not None
    valkey = int(starter.stdout.readline())
    assert alive(valkey)
    starter.send_signal(signal.SIGKILL)
    starter.wait()
    wait_for(lambda: not alive(valkey), 15, "the embedded Valkey to die with the process that started it")
