"""Flower, started as ``llamas up`` starts it, sees the running herd and asks for a password."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from router.local.up import FLOWER_USER, flower_env, flower_password
from tests.processes import ROOT, wait_for
from tests.stack import free_port, running_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sqlite_stack(tmp_path_factory, redis_url):
    yield from running_stack("sqlite", tmp_path_factory)


def test_flower_asks_for_the_generated_password_and_then_lists_the_workers(sqlite_stack, tmp_path):
    password, created = flower_password(tmp_path)
    assert created and flower_password(tmp_path) == (password, False)  # made once, then kept
    assert (tmp_path / "flower.password").stat().st_mode & 0o777 == 0o600
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")
    # An inherited FLOWER_UNAUTHENTICATED_API must not open the API again.
    env = flower_env(dict(sqlite_stack.env, FLOWER_UNAUTHENTICATED_API="true"), password)
    flower = subprocess.Popen(
        [sys.executable, "-m", "router.local.flower", f"--port={port}", "--address=127.0.0.1"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    base, auth = f"http://127.0.0.1:{port}", (FLOWER_USER, password)
    try:
        workers: dict = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                reply = httpx.get(f"{base}/api/workers", params={"refresh": "1"}, auth=auth, timeout=10)
                workers = reply.json() if reply.status_code == 200 else {}
            except httpx.HTTPError:
                workers = {}
            if {"llama@test", "herder@test"} <= set(workers):
                break
            time.sleep(0.5)
        assert {"llama@test", "herder@test", "requester@test"} <= set(workers), (tmp_path / "flower.log").read_text()
        assert "llama_tasks.generate" in workers["llama@test"]["registered"]
        assert "router.submit" in workers["herder@test"]["registered"]

        # Without the password, or with a wrong one, nothing is shown: not the
        # API (every task's arguments), not the pages.
        for path in ("/api/workers", "/api/tasks", "/", "/tasks", "/tasks/datatable", "/metrics"):
            assert httpx.get(base + path, timeout=10).status_code == 401, path
            assert httpx.get(base + path, auth=(FLOWER_USER, "wrong"), timeout=10).status_code == 401, path
        assert httpx.get(f"{base}/api/tasks", auth=auth, timeout=10).status_code == 200

        # A request shows up as its tasks; the herder's housekeeping tick (every
        # 0.5 s here, so several ran meanwhile) shows up as nothing at all.
        _, requester = sqlite_stack.account(100_000)
        job = requester.run("Say one word.", tokens=4)
        job.result(timeout=120)

        def listed() -> set[str] | None:
            tasks = httpx.get(f"{base}/api/tasks", auth=auth, timeout=10).json()
            names = {t.get("name") for t in tasks.values()}
            return names if "llama_tasks.generate" in names else None

        seen = wait_for(listed, 60, "Flower to list the request's generate task")
        assert "router.submit" in seen and "router.tick" not in seen, seen
    finally:
        flower.terminate()
        flower.wait(timeout=20)
        log.close()
