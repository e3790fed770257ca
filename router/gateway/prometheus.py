"""The gateway's ``/metrics``: the service's counters and histograms, read at scrape time.

The herder and gateway processes record events into Redis hashes
(``router.core.metrics``); this collector turns them into metric families, and
reads the gauges — queue depth, slots — fresh from SQL and the worker heartbeats.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, cast

import redis
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from sqlalchemy import func, select

from router.core import dispatch, fees
from router.core.metrics import BUCKETS_S, COUNTERS, HISTOGRAMS, key
from router.core.models import QUEUED, RUNNING, JobRow
from router.core.service import HerderService

#: Bid bands for the queue-depth gauge: upper bounds of the multiplier.
BID_BANDS = ((1.5, "<1.5"), (2.0, "1.5-2"), (5.0, "2-5"), (float("inf"), ">=5"))


def _hash(r: redis.Redis, name: str) -> dict[Any, Any]:
    return cast(dict[Any, Any], r.hgetall(key(name)))


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _band(bid_ppm: int) -> str:
    multiplier = bid_ppm / fees.PPM
    return next(name for bound, name in BID_BANDS if multiplier < bound)


class ServiceCollector(Collector):
    """Collects the Redis-held counters and histograms and fresh gauges."""

    def __init__(self, service: HerderService) -> None:
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


