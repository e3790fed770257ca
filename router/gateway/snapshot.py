"""What the live dashboard shows: one snapshot of the marketplace per audience.

The admin (the admin key) sees the fee market, the herd, the money and
recent jobs; a requester (an API key) sees their balance, their own jobs and
the current prices. Neither view carries a prompt, a completion or a job's
reference: ids, sizes, tokens, times and money only.

The snapshot is plain data built from one read transaction; the gateway
streams one every ``DEFAULT_PERIOD_S`` (``router.gateway.dashboard``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from llama_tasks.control import ACCEPTED, DRAINING, IDLE, LOADING, SERVING
from router.core import dispatch, fees, info, ledger, metrics, operators
from router.core.keys import DASHBOARD_SEEN
from router.core.models import (
    DONE,
    ESCROW,
    FINAL_STATES,
    QUEUED,
    REVENUE,
    RUNNING,
    Account,
    JobRow,
    Transfer,
)
from router.core.settings import HerderSettings

#: Seconds between two snapshots of one open dashboard.
DEFAULT_PERIOD_S = 1.0
#: Recent jobs listed.
RECENT_JOBS = 50
#: Seconds over which a worker's delivered tokens/s is counted.
SPEED_WINDOW_S = 60.0
#: The ledger audit reads every transfer: run at most this often per process.
BOOKS_EVERY_S = 10.0
#: Minutes of per-minute money history sent with each snapshot.
HISTORY_MINUTES = 60
#: A dead worker stays on the dashboard this long after its last heartbeat.
FORGET_DEAD_S = 3600.0
#: Placement decisions listed.
PLACEMENT_DECISIONS = 30


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def job_line(row: JobRow, account: str | None = None) -> dict[str, Any]:
    """One job as the dashboard lists it: no prompt, completion or reference."""
    timings = json.loads(row.timings) if row.timings else {}
    queue_wait = row.dispatched_at - row.created_at if row.dispatched_at is not None else None
    ttft = None
    if queue_wait is not None and "prompt_s" in timings:  # the same figure as /metrics' histogram
        ttft = metrics.time_to_first_token(queue_wait, timings)
    line = {
        "job_id": row.id,
        "model": row.model,
        "state": row.state,
        "multiplier": row.bid_ppm / fees.PPM,
        "offered": row.offered,
        "queue_wait_s": _round(queue_wait),
        "ttft_s": _round(ttft),
        "prompt_tokens": row.prompt_tokens,
        "completion_tokens": row.completion_tokens,
        "charged": row.charged,
        "refunded": row.refunded,
        "worker": row.worker,
        "created_at": row.created_at,
    }
    if account is not None:
        line["account"] = account
    return line


def market(session: Session, herd: list[dict[str, Any]]) -> dict[str, Any]:
    """Queue and running jobs per model, and the queued bids by multiplier."""
    slots = dispatch.capacity(herd)
    counts: dict[str, dict[str, int]] = {}
    for model, state, n in session.execute(
        select(JobRow.model, JobRow.state, func.count())
        .where(JobRow.state.in_((QUEUED, RUNNING))).group_by(JobRow.model, JobRow.state)
    ):
        counts.setdefault(model, {})[state] = int(n)
    models = sorted(set(counts) | set(slots))
    bids = session.execute(
        select(JobRow.bid_ppm, func.count()).where(JobRow.state == QUEUED)
        .group_by(JobRow.bid_ppm).order_by(JobRow.bid_ppm)
    ).all()
    return {
        "models": [{"model": m, "queued": counts.get(m, {}).get(QUEUED, 0),
                    "running": counts.get(m, {}).get(RUNNING, 0), "slots": slots.get(m, 0)} for m in models],
        "bids": [{"multiplier": ppm / fees.PPM, "jobs": int(n)} for ppm, n in bids],
    }


def _throughput(session: Session, now: float) -> dict[str, float]:
    """Completion tokens per second each worker delivered over the last ``SPEED_WINDOW_S``."""
    rows = session.execute(
        select(JobRow.worker, func.sum(JobRow.completion_tokens))
        .where(JobRow.state == DONE, JobRow.finished_at >= now - SPEED_WINDOW_S).group_by(JobRow.worker)
    )
    return {worker: round(int(tokens or 0) / SPEED_WINDOW_S, 1) for worker, tokens in rows if worker}


def attributed(doc: dict[str, Any], keys: operators.Keys, now: float) -> dict[str, Any]:
    """A heartbeat with ``operator`` only where its signature proves it; an unproven claim kept apart."""
    verified = operators.verify_heartbeat(doc, keys, now)
    claimed = doc.get("operator")
    return {**doc, "operator": verified,
            "operator_claimed": claimed if verified is None and isinstance(claimed, str) else None}


def model_state(doc: dict[str, Any]) -> str:
    """What a heartbeat says its worker does with its model: idle, loading, serving or draining."""
    return str(doc.get("state") or (SERVING if doc.get("model") else IDLE))


def moving_to(doc: dict[str, Any]) -> str | None:
    """The model a draining or loading worker is changing to (the Init it accepted), else None."""
    init = doc.get("init") or {}
    if model_state(doc) in (DRAINING, LOADING) and init.get("outcome") == ACCEPTED:
        return str(init.get("model"))
    return None


def placement_view(settings: HerderSettings, decisions: list[dict[str, Any]],
                   waiting: dict[str, str] | None = None) -> dict[str, Any]:
    """Demand placement's mode, latest decisions (newest first) and the models whose queue waits with no
    worker moving to them, each with why (workers, models, counts and reasons: no text)."""
    keep = ("at", "worker", "from", "to", "reason")
    return {"mode": settings.placement, "dwell_s": settings.placement_dwell_s,
            "wait_s": settings.placement_wait_s,
            "decisions": [{k: d.get(k) for k in keep} for d in decisions[:PLACEMENT_DECISIONS]],
            "waiting": [{"model": m, "reason": why} for m, why in sorted((waiting or {}).items())]}


@dataclass
class HerdMemory:
    """Workers seen alive, kept in Redis so a dead one is shown as dead, not forgotten.

    A heartbeat expires a few intervals after its worker stops; the dashboard
    remembers when each worker last beat (shared by every gateway process) so
    the moment it vanishes it can be listed as dead.
    """

    r: redis.Redis
    forget_after_s: float = FORGET_DEAD_S

    def observe(self, herd: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
        """Every live worker and every remembered dead one, each marked ``alive`` with ``last_seen``."""
        alive = {w["worker"]: w for w in herd if w.get("worker")}
        if alive:
            self.r.hset(DASHBOARD_SEEN, mapping={
                name: json.dumps({**doc, "last_seen": now}) for name, doc in alive.items()
            })
        remembered = {k.decode() if isinstance(k, bytes) else k: json.loads(v)
                      for k, v in self.r.hgetall(DASHBOARD_SEEN).items()}
        stale = [name for name, doc in remembered.items()
                 if name not in alive and now - float(doc.get("last_seen", 0)) > self.forget_after_s]
        if stale:
            self.r.hdel(DASHBOARD_SEEN, *stale)
        workers = []
        for name in sorted(set(remembered) - set(stale) | set(alive)):
            doc = alive.get(name) or remembered[name]
            last_seen = now if name in alive else float(remembered[name].get("last_seen", 0))
            workers.append({
                "worker": name, "model": doc.get("model"), "state": model_state(doc), "since": doc.get("since"),
                "moving_to": moving_to(doc), "gpus": doc.get("gpus") or [],
                "slots": doc.get("slots", 0), "busy": doc.get("busy", 0) if name in alive else 0,
                "operator": doc.get("operator"), "operator_claimed": doc.get("operator_claimed"),
                "alive": name in alive,
                "last_seen_s_ago": round(now - last_seen, 1),
            })
        return workers


def herd_view(session: Session, workers: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """The remembered herd with the tokens/s each worker delivered over the last minute."""
    speeds = _throughput(session, now)
    return [{**w, "tokens_per_s": speeds.get(w["worker"], 0.0)} for w in workers]


@dataclass
class BooksCache:
    """The ledger audit's verdict, re-run at most every ``every_s``."""

    every_s: float = BOOKS_EVERY_S
    _verdict: dict[str, Any] | None = None
    _at: float = float("-inf")

    def verdict(self, session: Session, now: float) -> dict[str, Any]:
        if self._verdict is None or now - self._at >= self.every_s:
            problems = ledger.check(session)
            self._verdict, self._at = {"balanced": not problems, "problems": problems[:20], "checked_at": now}, now
        return self._verdict


def money(session: Session, now: float) -> dict[str, Any]:
    """Revenue, refunds and escrow: in all, per model, and per minute over the last hour."""
    balances = dict(session.execute(
        select(Account.name, Account.balance).where(Account.kind == "system", Account.name.in_((ESCROW, REVENUE)))
    ).all())
    charged_kinds = ("capture", "earn")
    totals = dict(session.execute(
        select(Transfer.kind, func.sum(Transfer.amount)).where(Transfer.kind.in_((*charged_kinds, "release")))
        .group_by(Transfer.kind)
    ).all())
    per_model = [
        {"model": m, "jobs": int(n), "charged": int(c or 0), "refunded": int(r or 0)}
        for m, n, c, r in session.execute(
            select(JobRow.model, func.count(), func.sum(JobRow.charged), func.sum(JobRow.refunded))
            .where(JobRow.state.in_(FINAL_STATES)).group_by(JobRow.model).order_by(JobRow.model)
        )
    ]
    since = now - HISTORY_MINUTES * 60
    minute = func.floor(JobRow.finished_at / 60)
    history = [
        {"minute": int(m) * 60, "charged": int(c or 0), "refunded": int(r or 0), "jobs": int(n)}
        for m, c, r, n in session.execute(
            select(minute, func.sum(JobRow.charged), func.sum(JobRow.refunded), func.count())
            .where(JobRow.finished_at >= since).group_by(minute).order_by(minute)
        )
    ]
    return {
        "revenue": int(balances.get(REVENUE, 0)),
        "escrow": int(balances.get(ESCROW, 0)),
        "charged": int(sum(totals.get(k) or 0 for k in charged_kinds)),
        "refunded": int(totals.get("release") or 0),
        "per_model": per_model,
        "history": history,
    }


def recent_jobs(session: Session, account_id: int | None = None, limit: int = RECENT_JOBS) -> list[dict[str, Any]]:
    """The latest jobs (of one account when given), newest first, with their account's name."""
    query = select(JobRow, Account.name).join(Account, Account.id == JobRow.account_id)
    if account_id is not None:
        query = query.where(JobRow.account_id == account_id)
    rows = session.execute(query.order_by(JobRow.seq.desc()).limit(limit)).all()
    return [job_line(row, None if account_id is not None else name) for row, name in rows]


def admin_view(session: Session, settings: HerderSettings, herd: list[dict[str, Any]],
               workers: list[dict[str, Any]], books: BooksCache, now: float | None = None,
               decisions: list[dict[str, Any]] | None = None,
               waiting: dict[str, str] | None = None) -> dict[str, Any]:
    """Everything but text, for the admin's dashboard; ``decisions`` and ``waiting`` are placement's latest."""
    now = time.time() if now is None else now
    return {
        "role": "admin",
        "now": now,
        "prices": info.prices(session, settings, herd, now),
        "market": market(session, herd),
        "herd": herd_view(session, workers, now),
        "placement": placement_view(settings, decisions or [], waiting),
        "money": {**money(session, now), "books": books.verdict(session, now)},
        "operators": operators.list_operators(session),
        "jobs": recent_jobs(session),
    }


def requester_view(session: Session, settings: HerderSettings, herd: list[dict[str, Any]], account: Account,
                   now: float | None = None) -> dict[str, Any]:
    """A requester's balance, their own jobs and the current prices; nothing of other accounts."""
    now = time.time() if now is None else now
    return {
        "role": "requester",
        "now": now,
        "account": account.name,
        "balance": ledger.balance(session, account),
        "prices": info.prices(session, settings, herd, now),
        "jobs": recent_jobs(session, account.id),
    }
