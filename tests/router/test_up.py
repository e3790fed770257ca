"""``llamas up``: the whole service from one command, supervised, stopped cleanly."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from router.up import port_answers
from tests.processes import ROOT
from tests.stack import free_port

pytestmark = pytest.mark.slow


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is not running.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_up_answers_a_paid_request_restarts_a_dead_component_and_stops_everything(tmp_path, redis_url):
    port, flower_port = free_port(), free_port()
    env = dict(os.environ, LLAMAS_HOME=str(tmp_path / "home"), LLAMAS_REDIS_URL=redis_url, COLUMNS="200")
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "up", "--port", str(port), "--flower-port", str(flower_port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            _wait_for(lambda: "Ctrl-C stops everything" in log.read_text() or up.poll() is not None, 180, "up")
            text = log.read_text()
            assert up.poll() is None, text
            assert "created 'demo' with 1,000,000 credits" in text and "llm_" in text
            assert f"http://127.0.0.1:{port}" in text and f"http://127.0.0.1:{flower_port}" in text
            assert "answer:" in text and "charged" in text and "refunded" in text
            children = _children(up.pid)
            assert len(children) == 4  # worker, herder, gateway, flower

            # Kill the gateway: it is reported and restarted.
            gateway = next(p for p in children if "uvicorn" in Path(f"/proc/{p}/cmdline").read_text())
            os.kill(gateway, signal.SIGKILL)
            _wait_for(lambda: "gateway exited" in log.read_text(), 30, "the death report")
            _wait_for(lambda: gateway not in _children(up.pid) and len(_children(up.pid)) == 4, 60, "restart")
            _wait_for(lambda: port_answers(port), 60, "the restarted gateway")
            children = _children(up.pid)
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(timeout=90)
    assert "stopped." in log.read_text()
    assert not [p for p in children if _alive(p)], "children left running"
    # The demo key is kept for later runs, readable by its owner only.
    assert (tmp_path / "home" / "demo.key").stat().st_mode & 0o777 == 0o600


def test_a_taken_port_is_a_clear_error(tmp_path, redis_url):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = dict(os.environ, LLAMAS_HOME=str(tmp_path / "home"), LLAMAS_REDIS_URL=redis_url)
        res = subprocess.run([sys.executable, "-m", "router.cli", "up", "--port", str(port)],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert f"port {port} for the HTTP gateway is already taken" in res.stderr
    assert "--port" in res.stderr and "Traceback" not in res.stderr
