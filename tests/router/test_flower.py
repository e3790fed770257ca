"""Flower sees the running herd, through its HTTP API."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.processes import ROOT
from tests.stack import free_port, running_stack

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sqlite_stack(tmp_path_factory, redis_url):
    yield from running_stack("sqlite", tmp_path_factory)


def test_flower_lists_the_running_workers(sqlite_stack, tmp_path):
    port = free_port()
    log = open(tmp_path / "flower.log", "wb")
    flower = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "llama_tasks", "flower", f"--port={port}",
         "--address=127.0.0.1"],
        cwd=ROOT, env=dict(sqlite_stack.env, FLOWER_UNAUTHENTICATED_API="true"), stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        workers: dict = {}
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/api/workers", params={"refresh": "1"}, timeout=10)
                workers = reply.json() if reply.status_code == 200 else {}
            except httpx.HTTPError:
                workers = {}
            if {"llama@test", "herder@test"} <= set(workers):
                break
            time.sleep(0.5)
        assert {"llama@test", "herder@test", "requester@test"} <= set(workers), (tmp_path / "flower.log").read_text()
        assert "llama_tasks.generate" in workers["llama@test"]["registered"]
        assert "router.submit" in workers["herder@test"]["registered"]
    finally:
        flower.terminate()
        flower.wait(timeout=20)
        log.close()
