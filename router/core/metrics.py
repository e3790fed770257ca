"""Prometheus metrics for the whole service, exposed by the gateway's /metrics.

Events happen in many processes (herder children, gateways), so counters and
histograms live in Redis hashes (one ``HINCRBY`` pipeline per event) and the
collector turns them into metric families at scrape time. Gauges — queue
depth, slots — are read fresh from SQL and the worker heartbeats.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, cast

import redis
from redis.client import Pipeline
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from router.core.keys import METRICS_PREFIX
from router.core import dispatch, fees
from router.core.models import QUEUED, RUNNING, JobRow

if TYPE_CHECKING:
    from router.core.service import HerderService

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
#: Bid bands for the queue-depth gauge: upper bounds of the multiplier.
BID_BANDS = ((1.5, "<1.5"), (2.0, "1.5-2"), (5.0, "2-5"), (float("inf"), ">=5"))


def _key(name: str) -> str:
    return METRICS_PREFIX + name


def inc(r: redis.Redis | Pipeline, name: str, amount: int = 1, label: str = "") -> None:
    """Add to a counter (``label`` picks one series of a labelled counter)."""
    if amount:
        r.hincrby(_key(name), label, amount)


def observe(pipe: Pipeline, name: str, value_s: float) -> None:
    """Queue one histogram observation (cumulative buckets, as Prometheus wants)."""
    for bound in BUCKETS_S:
        if value_s <= bound:
            pipe.hincrby(_key(name), str(bound), 1)
    pipe.hincrby(_key(name), "+Inf", 1)
    pipe.hincrbyfloat(_key(name), "sum", value_s)


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


def _hash(r: redis.Redis, name: str) -> dict[Any, Any]:
    return cast(dict[Any, Any], r.hgetall(_key(name)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _band(bid_ppm: int) -> str:
    multiplier = bid_ppm / fees.PPM
    return next(name for bound, name in BID_BANDS if multiplier < bound)


class ServiceCollector(Collector):
    """Collects the Redis-held counters and histograms and fresh gauges."""

    def __init__(self, service: "HerderService") -> None:
        self._svc = service

    def collect(self) -> Iterator[Metric]:
        r = self._svc.redis
        for name, doc in COUNTERS.items():
            if name == "admissions":
                # Every admission writes a job row: counted from the ledger at
                # scrape time instead of one more Redis write per request.
                with self._svc.read_sessions.begin() as session:
                    admitted = session.scalar(select(func.count()).select_from(JobRow)) or 0
                yield CounterMetricFamily(f"llamas_{name}", doc, value=admitted)
                continue
            raw = {_text(k): int(v) for k, v in _hash(r, name).items()}
            if name in ("refusals", "jobs_finished"):
                label = "reason" if name == "refusals" else "state"
                family = CounterMetricFamily(f"llamas_{name}", doc, labels=[label])
                for value, count in sorted(raw.items()):
                    family.add_metric([value], count)
            else:
                family = CounterMetricFamily(f"llamas_{name}", doc, value=raw.get("", 0))
            yield family
        for name, doc in HISTOGRAMS.items():
            raw_h = {_text(k): float(v) for k, v in _hash(r, name).items()}
            buckets = [(str(b), raw_h.get(str(b), 0.0)) for b in BUCKETS_S] + [("+Inf", raw_h.get("+Inf", 0.0))]
            yield HistogramMetricFamily(f"llamas_{name}", doc, buckets=buckets, sum_value=raw_h.get("sum", 0.0))
        yield from self._gauges()

    def _gauges(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("llamas_queue_depth", "Queued jobs by model and bid band.",
                                  labels=["model", "bid_band"])
        running = GaugeMetricFamily("llamas_running_jobs", "Dispatched jobs not yet settled.", labels=["model"])
        with self._svc.sessions.begin() as session:
            counts: dict[tuple[str, str], int] = {}
            for model, bid, n in session.execute(
                select(JobRow.model, JobRow.bid_ppm, func.count()).where(JobRow.state == QUEUED)
                .group_by(JobRow.model, JobRow.bid_ppm)
            ):
                counts[(model, _band(bid))] = counts.get((model, _band(bid)), 0) + n
            for (model, band), n in sorted(counts.items()):
                depth.add_metric([model, band], n)
            for model, n in session.execute(
                select(JobRow.model, func.count()).where(JobRow.state == RUNNING).group_by(JobRow.model)
            ):
                running.add_metric([model], n)
        yield depth
        yield running
        herd = self._svc.herd()
        slots = GaugeMetricFamily("llamas_slots", "Worker slots by model.", labels=["model"])
        busy = GaugeMetricFamily("llamas_busy_slots", "Busy worker slots by model.", labels=["model"])
        for model, n in sorted(dispatch.capacity(herd).items()):
            slots.add_metric([model], n)
            busy.add_metric([model], sum(int(w.get("busy", 0)) for w in herd if w.get("model") == model))
        yield slots
        yield busy
        workers = GaugeMetricFamily("llamas_workers", "Live workers (by heartbeat).")
        workers.add_metric([], len(herd))
        yield workers


