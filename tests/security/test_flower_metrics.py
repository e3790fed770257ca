"""Flower's ``/metrics`` asks for the password like the rest of Flower.

The attack: with no password, read Flower's Prometheus metrics (every
worker's name, every task's name, counts and run times), which Flower 2
serves to anyone whatever its basic auth says. Flower is started exactly as
``llamas up`` and ``make flower`` start it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx

from router.local.up import FLOWER_USER, flower_env, flower_password
from tests.processes import ROOT, wait_for
from tests.stack import free_port


def test_flowers_metrics_need_the_password(tmp_path: Path) -> None:
    password, _ = flower_password(tmp_path)
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")
    # As ``llamas up`` runs it (an inherited FLOWER_UNAUTHENTICATED_API must not open anything).
    env = flower_env(dict(os.environ, FLOWER_UNAUTHENTICATED_API="true"), password)
    flower = subprocess.Popen([sys.executable, "-m", "router.local.flower", f"--port={port}", "--address=127.0.0.1"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    base, auth = f"http://127.0.0.1:{port}", (FLOWER_USER, password)

    def answers() -> bool:
        try:
            return httpx.get(f"{base}/healthcheck", timeout=2).status_code == 200
        except httpx.HTTPError:
            return flower.poll() is not None  # ended: the assertions below say how

    try:
        wait_for(answers, 60, "Flower to answer", lambda: (tmp_path / "flower.log").read_text())
        assert flower.poll() is None, (tmp_path / "flower.log").read_text()
        anonymous = httpx.get(f"{base}/metrics", timeout=10)
        assert anonymous.status_code == 401 and "flower_" not in anonymous.text
        assert anonymous.headers.get("WWW-Authenticate", "").startswith("Basic")
        assert httpx.get(f"{base}/metrics", auth=(FLOWER_USER, "wrong"), timeout=10).status_code == 401
        # The pages and the API were already behind the password; they still are.
        assert httpx.get(f"{base}/api/workers", timeout=10).status_code == 401
        allowed = httpx.get(f"{base}/metrics", auth=auth, timeout=10)
        assert allowed.status_code == 200 and "flower_" in allowed.text
    finally:
        flower.terminate()
        flower.wait(timeout=20)
        log.close()
