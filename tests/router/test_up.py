"""``llamas up``: the whole service from one command, supervised, stopped cleanly."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from router.gateway.http_protocol import HTTP_PROTOCOL
from router.local.supervisor import RUN_TOKEN_ENV
from router.local.up import port_answers
from tests.processes import ROOT, alive, children, descendants, wait_for
from tests.stack import free_port

pytestmark = pytest.mark.slow


def _env(home: Path, redis_url: str) -> dict[str, str]:
    return dict(os.environ, LLAMAS_HOME=str(home), LLAMAS_REDIS_URL=redis_url, COLUMNS="200")


def _start_up(env: dict[str, str], log: Path, port: int, flower_port: int,
              *extra: str) -> subprocess.Popen[bytes]:
    """``llamas up`` in the background, returned once it serves (or has exited)."""
    ready = "Ctrl-C stops everything"
    before = log.read_text().count(ready) if log.exists() else 0
    out = open(log, "ab")
    up = subprocess.Popen(
        [sys.executable, "-m", "router.cli", "up", "--port", str(port), "--flower-port", str(flower_port), *extra],
        cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
    )
    out.close()
    wait_for(lambda: log.read_text().count(ready) > before or up.poll() is not None, 180, "up")
    assert up.poll() is None, log.read_text()
    return up


def _cli(env: dict[str, str], *argv: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "router.cli", *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


def test_up_answers_a_paid_request_restarts_a_dead_component_and_stops_everything(tmp_path, redis_url):
    port, flower_port = free_port(), free_port()
    env = _env(tmp_path / "home", redis_url)
    log = tmp_path / "up.log"
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [sys.executable, "-m", "router.cli", "up", "--port", str(port), "--flower-port", str(flower_port)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: "Ctrl-C stops everything" in log.read_text() or up.poll() is not None, 180, "up")
            text = log.read_text()
            assert up.poll() is None, text
            assert "created 'demo' with 1,000,000 credits" in text and "llm_" in text
            assert f"http://127.0.0.1:{port}" in text and f"http://127.0.0.1:{flower_port}" in text
            assert "answer:" in text and "charged" in text and "refunded" in text
            components = children(up.pid)
            assert len(components) == 4  # worker, herder, gateway, flower
            # The running set is recorded, and Flower's password was made and shown once.
            record = json.loads((tmp_path / "home" / "up.json").read_text())
            assert record["pid"] == up.pid and sorted(record["components"].values()) == sorted(components)
            assert record["ports"] == {"gateway": port, "flower": flower_port}
            password = (tmp_path / "home" / "flower.password").read_text().strip()
            assert password in text and "flower.password" in text
            # The dashboard is printed, and opens to the admin key made in the home (not printed).
            assert f"http://127.0.0.1:{port}/dashboard" in text
            admin = (tmp_path / "home" / "admin.key").read_text().strip()
            assert admin not in text and "admin.key" in text
            assert (tmp_path / "home" / "admin.key").stat().st_mode & 0o777 == 0o600
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
                assert http.post("/dashboard/session", json={"key": admin}).json() == {"role": "admin"}
                assert http.get("/dashboard/snapshot").json()["herd"][0]["alive"] is True
                assert http.get("/metrics").status_code == 401
                assert http.get("/metrics", headers={"Authorization": f"Bearer {admin}"}).status_code == 200
            # Flower's metrics too are behind its password.
            flower = f"http://127.0.0.1:{flower_port}/metrics"
            assert httpx.get(flower, timeout=30).status_code == 401
            assert httpx.get(flower, auth=("admin", password), timeout=30).status_code == 200
            # Everything the running service wrote in its home is its user's alone.
            home = tmp_path / "home"
            written = {p.relative_to(home).as_posix(): p.stat().st_mode & 0o777 for p in home.rglob("*")}
            assert {"ledger.db", "ledger.db-wal", "ledger.db-shm", "logs/herder.log", "up.json"} <= set(written)
            assert {name: mode for name, mode in written.items() if mode & 0o077} == {}, written
            assert home.stat().st_mode & 0o777 == 0o700

            # A second `llamas up` for the same home is refused, naming the running one.
            second = _cli(env, "up", "--port", str(free_port()), "--flower-port", str(free_port()))
            assert second.returncode != 0
            assert f"llamas up is already running for {tmp_path / 'home'} (pid {up.pid}" in second.stderr
            assert "llamas down" in second.stderr and "Traceback" not in second.stderr

            # Kill the gateway: it is reported and restarted.
            gateway = next(p for p in components if "uvicorn" in Path(f"/proc/{p}/cmdline").read_text())
            # Served with the gateway's own HTTP protocol (a deadline on request headers).
            assert HTTP_PROTOCOL in Path(f"/proc/{gateway}/cmdline").read_text()
            os.kill(gateway, signal.SIGKILL)
            wait_for(lambda: "gateway exited" in log.read_text(), 30, "the death report")
            wait_for(lambda: gateway not in children(up.pid) and len(children(up.pid)) == 4, 60, "restart")
            wait_for(lambda: port_answers(port), 60, "the restarted gateway")
            components = children(up.pid)
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(timeout=90)
    assert "stopped." in log.read_text()
    assert not [p for p in components if alive(p)], "children left running"
    assert not (tmp_path / "home" / "up.json").exists()
    # The demo key and Flower's password are kept for later runs, readable by their owner only.
    assert (tmp_path / "home" / "demo.key").stat().st_mode & 0o777 == 0o600
    assert (tmp_path / "home" / "flower.password").stat().st_mode & 0o777 == 0o600


def test_sigkill_of_up_stops_every_component_and_the_next_up_starts_on_the_same_ports(tmp_path, redis_url):
    port, flower_port = free_port(), free_port()
    home = tmp_path / "home"
    env, log = _env(home, redis_url), tmp_path / "up.log"
    first = _start_up(env, log, port, flower_port)
    second, seen = None, []
    try:
        processes = descendants(first.pid)
        seen += processes
        assert len(processes) >= 7  # 4 components, the worker's and herder's pool children, the beat
        first.send_signal(signal.SIGKILL)
        first.wait()
        wait_for(lambda: not [p for p in processes if alive(p)], 60,
                  f"every process of the killed up to exit: {[p for p in processes if alive(p)]}")
        # Its record stays behind (nothing ran to remove it) and describes only dead processes.
        assert json.loads((home / "up.json").read_text())["pid"] == first.pid

        second = _start_up(env, log, port, flower_port)
        assert json.loads((home / "up.json").read_text())["pid"] == second.pid
        processes = descendants(second.pid)
        seen += processes

        down = _cli(env, "down")
        assert down.returncode == 0, down.stderr
        assert f"stopped llamas up (pid {second.pid})" in down.stdout
        wait_for(lambda: second.poll() is not None, 30, "the second up to exit")
        assert not [p for p in processes if alive(p)], "processes left running"
        assert not (home / "up.json").exists()
        assert "stopped." in log.read_text()
    finally:
        for up in (first, second):
            if up is not None and up.poll() is None:
                up.send_signal(signal.SIGINT)
                up.wait(timeout=90)
        for pid in seen:  # orphans, where the feature broke
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def _leftover(token: str, ignore_sigterm: bool = False) -> subprocess.Popen[bytes]:
    """A real process that carries a run's token, as a component of a killed up would."""
    code = "import signal\n"
    if ignore_sigterm:
        code += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "print('ready', flush=True)\nwhile True:\n    signal.pause()  # until killed\n"
    proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, **{RUN_TOKEN_ENV: token}),
                            stdout=subprocess.PIPE, start_new_session=True)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"  # its handler is in place
    return proc


def test_a_stale_set_is_named_by_up_and_cleared_by_down(tmp_path, redis_url):
    home = tmp_path / "home"
    home.mkdir()
    env = _env(home, redis_url)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    token = os.urandom(16).hex()
    polite, stubborn = _leftover(token), _leftover(token, ignore_sigterm=True)
    # As a stale set would, something holds the gateway's port: the refusal
    # must name the set, not merely the port (and a broken check starts nothing).
    taken = socket.socket()
    try:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (home / "up.json").write_text(json.dumps({
            "token": token, "pid": dead.pid, "pid_started": None, "started_at": time.time(),
            "ports": {"gateway": port, "flower": free_port()},
            "components": {"gateway": polite.pid, "herder": stubborn.pid},
        }))
        refused = _cli(env, "up", "--port", str(port), "--flower-port", str(free_port()))
        assert refused.returncode != 0 and "Traceback" not in refused.stderr
        line = refused.stderr.strip()
        assert "\n" not in line
        assert f"a previous llamas up for {home} (pid {dead.pid}) died and left processes running" in line
        assert str(polite.pid) in line and str(stubborn.pid) in line and "`llamas down`" in line

        down = _cli(env, "down", "--grace", "1")
        assert down.returncode == 0, down.stderr
        assert str(polite.pid) in down.stdout and str(stubborn.pid) in down.stdout
        assert polite.wait(timeout=10) == -signal.SIGTERM
        assert stubborn.wait(timeout=10) == -signal.SIGKILL  # after the grace
        assert not (home / "up.json").exists()
        assert "nothing to stop" in _cli(env, "down").stdout
    finally:
        taken.close()
        for proc in (polite, stubborn):
            proc.kill()
            proc.wait()


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


def test_workers_without_demand_placement_or_beside_models_is_a_clear_error(tmp_path, redis_url):
    env = dict(os.environ, LLAMAS_HOME=str(tmp_path / "home"), LLAMAS_REDIS_URL=redis_url)
    alone = _cli(env, "up", "--workers", "2", timeout_s=60)
    assert alone.returncode != 0 and "LLAMAS_PLACEMENT=demand" in alone.stderr and "Traceback" not in alone.stderr
    both = _cli(dict(env, LLAMAS_PLACEMENT="demand"), "up", "--workers", "2", "--model", "smollm2", timeout_s=60)
    assert both.returncode != 0 and "not both" in both.stderr and "Traceback" not in both.stderr


def test_up_with_workers_the_herder_places_answers_the_demo_request(tmp_path, redis_url):
    port, flower_port = free_port(), free_port()
    env = dict(_env(tmp_path / "home", redis_url), LLAMAS_PLACEMENT="demand")
    log = tmp_path / "up.log"
    up = _start_up(env, log, port, flower_port, "--workers", "2")
    try:
        text = log.read_text()
        assert text.count("no model yet (the herder places it on demand)") == 2
        # The demo request waited for placement and was answered, paid for.
        assert "answer:" in text and "charged" in text and "refunded" in text
        listed = _cli(env, "workers", "list", "--json")
        assert listed.returncode == 0, listed.stderr
        served = [w for w in json.loads(listed.stdout) if w["model"] == "smollm2" and w["state"] == "serving"]
        assert served, listed.stdout
        assert "placement: " in (tmp_path / "home" / "logs" / "herder.log").read_text()
    finally:
        up.send_signal(signal.SIGINT)
        up.wait(timeout=60)
