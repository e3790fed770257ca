"""Recording the service's metrics; the gateway's /metrics reads them (``router.gateway.prometheus``).

Events happen in many processes (herder children, gateways), so counters and
histograms live in Redis hashes (one ``HINCRBY`` pipeline per event) and the
collector turns them into metric families at scrape time.
"""

from __future__ import annotations

from typing import Any

import redis
from redis.client import Pipeline

from router.core.keys import METRICS_PREFIX

#: Histogram buckets in seconds, shared by the three latency histograms.
BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
HISTOGRAMS = {
    "queue_wait_seconds": "Time from admission to dispatch.",
    "latency_seconds": "Time from admission to the settled answer (end to end).",
    "time_to_first_token_seconds": "Time from admission to the first generated token.",
}
COUNTERS = {
    "admissions": "Requests admitted (money held).",
    "refusals": "Requests refused before any money moved, by reason.",
    "tokens_generated": "Completion tokens of settled jobs.",
    "revenue": "Money charged for settled jobs (smallest unit).",
    "refunds": "Money returned from holds (smallest unit).",
    "jobs_finished": "Jobs that ended, by final state.",
    "redeliveries": "Dispatches beyond a job's first attempt.",
}


def key(name: str) -> str:
    """The Redis hash holding metric ``name``."""
    return METRICS_PREFIX + name


def inc(r: redis.Redis | Pipeline, name: str, amount: int = 1, label: str = "") -> None:
    """Add to a counter (``label`` picks one series of a labelled counter)."""
    if amount:
        r.hincrby(key(name), label, amount)


def observe(pipe: Pipeline, name: str, value_s: float) -> None:
    """Queue one histogram observation (cumulative buckets, as Prometheus wants)."""
    for bound in BUCKETS_S:
        if value_s <= bound:
            pipe.hincrby(key(name), str(bound), 1)
    pipe.hincrby(key(name), "+Inf", 1)
    pipe.hincrbyfloat(key(name), "sum", value_s)


def time_to_first_token(herder_wait_s: float, timings: dict[str, Any]) -> float:
    """Admission to first token: the herder's queue, the worker's, the wait for a free engine slot,
    then the prompt's evaluation (the worker's ``timings``)."""
    return (herder_wait_s + float(timings.get("queue_wait_s", 0.0)) + float(timings.get("engine_queue_s", 0.0))
            + float(timings.get("prompt_s", 0.0)))


def record_outcome(r: redis.Redis, response: dict[str, Any], created_at: float, dispatched_at: float | None,
                   finished_at: float | None) -> None:
    """Everything one finished job adds to the metrics (one round trip); called once per job."""
    pipe = r.pipeline(transaction=False)
    inc(pipe, "jobs_finished", label=response["status"])
    inc(pipe, "refunds", int(response.get("refunded") or 0))
    if response["status"] == "done" and finished_at is not None and dispatched_at is not None:
        inc(pipe, "revenue", int(response.get("charged") or 0))
        inc(pipe, "tokens_generated", int(response.get("completion_tokens") or 0))
        wait = max(0.0, dispatched_at - created_at)
        observe(pipe, "queue_wait_seconds", wait)
        observe(pipe, "latency_seconds", max(0.0, finished_at - created_at))
        timings = response.get("timings") or {}
        observe(pipe, "time_to_first_token_seconds", time_to_first_token(wait, timings))
    pipe.execute()
