"""What a restricted broker user costs: a job's round trip and a Redis command, default user vs ACL user.

Run with ``pytest tests/bench/broker_acl.py -s`` (it starts a herder and
workers, as the end-to-end tests do). Medians; on a busy machine the job
round trips vary by tens of milliseconds either way.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

import pytest
import redis

from router import Herder
from tests.processes import llama_worker
from tests.security.test_broker_acl import acl_stack  # noqa: F401 (fixture)

JOBS = 8
COMMANDS = 3000


def _round_trips(herder: Herder) -> list[float]:
    herder.run("Say hi.", 4, temperature=0.0).result(timeout=60)  # warm: the model, the connections
    times = []
    for _ in range(JOBS):
        start = time.perf_counter()
        herder.run("Say hi.", 4, temperature=0.0).result(timeout=60)
        times.append(time.perf_counter() - start)
    return times


def _command_s(url: str, job: str) -> list[float]:
    r = redis.Redis.from_url(url)
    times = []
    for _ in range(COMMANDS):
        start = time.perf_counter()
        r.xrange(f"llamas:stream:{job}")
        times.append(time.perf_counter() - start)
    return times


@pytest.mark.slow
def test_bench_broker_acl(acl_stack: Any, tmp_path: Path) -> None:  # noqa: F811
    stack, creds = acl_stack
    house = _round_trips(Herder(creds.api_key))
    stack.worker.stop()
    env = dict(stack.env, LLAMAS_REDIS_URL=creds.operator_url, LLAMAS_OPERATOR=creds.operator,
               LLAMAS_OPERATOR_KEY=str(creds.key_file))
    worker = llama_worker("bench", 1, env, tmp_path / "bench-worker.log")
    try:
        worker.wait_ready(stack.r)
        restricted = _round_trips(Herder(creds.api_key, redis_url=creds.client_url))
    finally:
        worker.stop()
    plain_cmd = _command_s(stack.env["LLAMAS_REDIS_URL"], "none")
    acl_cmd = _command_s(creds.client_url, "none")
    ms = lambda xs: f"{statistics.median(xs) * 1000:.2f} ms"  # noqa: E731
    print(f"\njob round trip (4 tokens, {JOBS} jobs): default user {ms(house)}, ACL users {ms(restricted)}")
    print(f"XRANGE ({COMMANDS}): default user {ms(plain_cmd)}, ACL client user {ms(acl_cmd)}")
