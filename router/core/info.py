"""Info: prices, the queue, the herd and the price-discovery table (the original's ``Info``).

``describe`` is the whole of it, for the admin and the CLI; ``public`` is
what anyone may see over HTTP: everything a requester needs to price a
request and choose a bid, the herd as counts, and no worker's host name or
any process id.
"""

from __future__ import annotations

import math
import os
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from router.core import dispatch, fees, queue
from router.core.models import DONE, RUNNING, JobRow
from router.core.parts import TokenCounting
from router.core.settings import HerderSettings

#: Multipliers shown in Info's price-discovery table.
DISCOVERY_MULTIPLIERS = (1.0, 1.5, 2.0, 5.0)
#: Recent completed jobs averaged to estimate how long one job takes.
DURATION_SAMPLE = 50


def _version() -> str:
    try:
        return version("llamas")
    except PackageNotFoundError:
        return "0+unknown"


def _job_seconds(session: Session) -> float | None:
    """Mean dispatch-to-finish time of recent completed jobs."""
    recent = list(session.execute(
        select(JobRow.finished_at, JobRow.dispatched_at)
        .where(JobRow.state == DONE).order_by(JobRow.seq.desc()).limit(DURATION_SAMPLE)
    ))
    durations = [f - d for f, d in recent if f is not None and d is not None]
    return sum(durations) / len(durations) if durations else None


def discovery(session: Session, settings: HerderSettings, total_slots: int, running: int,
              now: float) -> list[dict[str, Any]]:
    """Expected position and wait of a new request at each of ``DISCOVERY_MULTIPLIERS``."""
    job_s = _job_seconds(session)
    table = []
    for m in DISCOVERY_MULTIPLIERS:
        ahead = queue.at_least(session, queue.priority(int(m * fees.PPM), now, settings.aging_per_s))
        wait = None
        if job_s is not None and total_slots:
            # Jobs ahead drain through every slot; a full herd frees one slot per job_s/slots.
            wait = math.ceil((ahead + max(0, running - total_slots + 1)) / total_slots) * job_s
        table.append({"multiplier": m, "position": ahead + 1, "expected_wait_s": wait})
    return table


def prices(session: Session, settings: HerderSettings, herd: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """The fees, the jobs running, the price-discovery table and the last accepted multiplier
    (the bid of the job admitted last): what ``/info`` and the dashboard both show."""
    slots = dispatch.capacity(herd)
    last = session.scalar(select(JobRow.bid_ppm).order_by(JobRow.seq.desc()).limit(1))
    running = session.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == RUNNING)) or 0
    return {
        "base_fee": settings.base_fee,
        "fee_per_token": settings.fee_per_token,
        "fee_per_cached_token": settings.cached_token_fee,
        "fee_per_embedding_token": settings.fee_per_embedding_token,
        "last_multiplier": (last / fees.PPM) if last is not None else None,
        "running": running,
        "discovery": discovery(session, settings, sum(slots.values()), running, now),
    }


def describe(session: Session, settings: HerderSettings, counter: TokenCounting, herd: list[dict[str, Any]],
             now: float) -> dict[str, Any]:
    slots = dispatch.capacity(herd)
    now_prices = prices(session, settings, herd, now)
    # One job may hold one slot's context: prompt + max_tokens (× n choices, each in its own slot).
    models = [{"name": s.name, "id": s.model_id, "slots": slots.get(s.name, 0),
               "context_per_job": settings.n_ctx}
              for s in counter.models().values()]
    return {
        "name": settings.service_name,
        "version": _version(),
        "base_fee": now_prices["base_fee"],
        "fee_per_token": now_prices["fee_per_token"],
        "fee_per_cached_token": now_prices["fee_per_cached_token"],
        "fee_per_embedding_token": now_prices["fee_per_embedding_token"],
        "last_multiplier": now_prices["last_multiplier"],
        "queue_length": queue.queued_count(session),
        "running": now_prices["running"],
        "models": models,
        "herd": [{k: w.get(k) for k in ("worker", "model", "slots", "busy", "gpus", "n_ctx")} for w in herd],
        "price_discovery": now_prices["discovery"],
        "pid": os.getpid(),
    }


#: What ``public`` keeps of each worker: its model and capacity, not its host name or pid.
PUBLIC_WORKER_FIELDS = ("model", "slots", "busy", "n_ctx")


def public(doc: dict[str, Any]) -> dict[str, Any]:
    """``describe``'s document as shown to anyone: the herd as counts, no host names, no pid."""
    shown = {k: v for k, v in doc.items() if k not in ("herd", "pid")}
    shown["herd"] = [{k: w.get(k) for k in PUBLIC_WORKER_FIELDS} | {"gpus": len(w.get("gpus") or [])}
                     for w in doc["herd"]]
    shown["workers"] = len(doc["herd"])
    return shown
