"""The herder's operations as plain methods: what the Celery tasks and the
HTTP gateway call. One ``HerderService`` per process holds the database
engine, the token counter, the signing key and a Redis client.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import redis
from sqlalchemy import and_, func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from llama_tasks import signing
from llama_tasks.constants import CANCEL_PREFIX
from llama_tasks.errors import Expired, InvalidRequest, LlamasError, Rejected
from llama_tasks.heartbeat import read_herd
from router import admission, dispatch, fees, forwarding, ledger, metrics, settlement, worker_loss
from router.db import make_engine, make_sessionmaker, upgrade
from router.errors import JobNotQueued, UnknownJob
from router.models import DONE, FINAL_STATES, QUEUED, RUNNING, JobRow
from router.request import Submission
from router.settings import HerderSettings, get_settings
from router.tokens import TokenCounter

log = logging.getLogger(__name__)

#: Multipliers shown in Info's price-discovery table.
DISCOVERY_MULTIPLIERS = (1.0, 1.5, 2.0, 5.0)
#: Recent completed jobs averaged to estimate how long one job takes.
DURATION_SAMPLE = 50


def _version() -> str:
    try:
        return version("llamas")
    except PackageNotFoundError:
        return "0+unknown"


class HerderService:
    """The herder's state for one process and everything it can do."""

    def __init__(self, settings: HerderSettings, send: dispatch.Sender,
                 send_callback: Callable[[str, str, dict[str, Any]], None],
                 send_webhook: Callable[[str], None]) -> None:
        self.settings = settings
        upgrade(settings.ledger_url)
        self.engine = make_engine(settings.ledger_url)
        self.sessions = make_sessionmaker(self.engine)
        self.counter = TokenCounter(settings.models_file)
        self.redis = redis.Redis.from_url(settings.redis_url)
        self._key = signing.load_private(settings.private_key_file)
        self._send_generation = send
        self._send_callback = send_callback
        self._send_webhook = send_webhook

    # --- requests -------------------------------------------------------------

    def submit(self, api_key: str, sub: Submission) -> dict[str, Any]:
        """Admit a request (or return the job its reference already names) and dispatch."""
        now = time.time()
        try:
            try:
                with self.sessions.begin() as session:
                    row, created = admission.admit(session, self.settings, self.counter, api_key, sub, now)
            except IntegrityError:
                # A concurrent submit with the same reference won the insert.
                with self.sessions.begin() as session:
                    row, created = admission.admit(session, self.settings, self.counter, api_key, sub, now)
        except LlamasError as exc:
            self.refused(exc)
            raise
        if created:
            metrics.inc(self.redis, "admissions")
            self.dispatch()
        return self.describe(row.id)

    def refused(self, exc: LlamasError) -> None:
        """Count a refusal by its reason, for the metrics."""
        try:
            metrics.inc(self.redis, "refusals", label=type(exc).__name__)
        except redis.RedisError:
            log.warning("could not count a refusal: Redis is unavailable")

    def quote(self, sub: Submission) -> dict[str, Any]:
        """What ``sub`` would cost, counted exactly as admission counts it."""
        quoted, prompt_tokens = admission.price(self.settings, self.counter, sub)
        return {
            "model": sub.model,
            "prompt_tokens": prompt_tokens,
            "max_tokens": sub.max_tokens,
            "n": sub.n,
            "base_fee": self.settings.base_fee,
            "fee_per_token": self.settings.fee_per_token,
            "fee_per_cached_token": self.settings.cached_token_fee,
            "quote": quoted,
        }

    def _own(self, session: Session, api_key: str, job_id: str) -> JobRow:
        account = ledger.account_by_key(session, api_key)
        row = session.scalar(select(JobRow).where(JobRow.id == job_id))
        if row is None or row.account_id != account.id:
            raise UnknownJob(job_id)
        return row

    def status(self, api_key: str, job_id: str) -> dict[str, Any]:
        with self.sessions.begin() as session:
            self._own(session, api_key, job_id)
        return self.describe(job_id)

    def cancel(self, api_key: str, job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one ends now with a full refund; a running one
        stops at the worker's next step and is charged for what it generated."""
        try:
            with self.sessions.begin() as session:
                account = ledger.account_by_key(session, api_key)
                row = settlement.cancel(session, account, job_id, time.time())
        except JobNotQueued as exc:
            if exc.state != RUNNING:
                raise
            self.redis.set(CANCEL_PREFIX + job_id, 1, ex=int(self.settings.lease_s) + 60)
            return self.describe(job_id)
        self.forward(row.id)
        return self.describe(job_id)

    def raise_bid(self, api_key: str, job_id: str, fee: int | None, multiplier: float | None) -> dict[str, Any]:
        with self.sessions.begin() as session:
            account = ledger.account_by_key(session, api_key)
            settlement.raise_bid(session, self.settings, account, job_id, fee, multiplier)
        return self.describe(job_id)

    def jobs(self, api_key: str, limit: int = 20) -> list[dict[str, Any]]:
        """The account's most recent jobs, newest first."""
        with self.sessions.begin() as session:
            account = ledger.account_by_key(session, api_key)
            rows = session.scalars(
                select(JobRow).where(JobRow.account_id == account.id)
                .order_by(JobRow.seq.desc()).limit(max(1, min(limit, 500)))
            )
            return [
                {"job_id": r.id, "state": r.state, "model": r.model, "reference": r.reference,
                 "multiplier": r.bid_ppm / fees.PPM, "offered": r.offered, "charged": r.charged,
                 "refunded": r.refunded, "completion_tokens": r.completion_tokens,
                 "created_at": r.created_at, "finished_at": r.finished_at}
                for r in rows
            ]

    def describe(self, job_id: str) -> dict[str, Any]:
        """A job's public state: position while queued, the response once final."""
        with self.sessions.begin() as session:
            row = session.scalar(select(JobRow).where(JobRow.id == job_id))
            if row is None:
                raise UnknownJob(job_id)
            doc: dict[str, Any] = {
                "job_id": row.id,
                "reference": row.reference,
                "state": row.state,
                "model": row.model,
                "prompt_tokens": row.prompt_tokens,
                "max_tokens": row.max_tokens,
                "n": row.n,
                "quote": row.quote,
                "offered": row.offered,
                "multiplier": row.bid_ppm / fees.PPM,
                "attempt": row.attempt,
                "position": self._position(session, row) if row.state == QUEUED else 0,
                "created_at": row.created_at,
            }
            if row.state in FINAL_STATES:
                doc["response"] = settlement.response(row)
            return doc

    @staticmethod
    def _position(session: Session, row: JobRow) -> int:
        ahead = session.scalar(
            select(func.count()).select_from(JobRow).where(
                JobRow.model == row.model,
                JobRow.state == QUEUED,
                or_(JobRow.priority > row.priority,
                    and_(JobRow.priority == row.priority, JobRow.seq < row.seq)),
            )
        ) or 0
        return ahead + 1

    # --- the herd ---------------------------------------------------------------

    def herd(self) -> list[dict[str, Any]]:
        return read_herd(self.redis)

    def _send(self, row: JobRow, envelope: dict[str, Any]) -> None:
        if row.attempt > 1:
            metrics.inc(self.redis, "redeliveries")
        self._send_generation(row, envelope)

    def dispatch(self) -> int:
        return dispatch.dispatch(self.sessions, self.settings, self.herd(), self._key, self._send, time.time())

    def on_result(self, task_id: str, doc: dict[str, Any]) -> None:
        """Settle a completed attempt whose authoritative result is ``doc``."""
        with self.sessions.begin() as session:
            row = settlement.settle(session, self.settings, self.counter, doc | {"task_id": task_id}, time.time())
        # Feed the freed slot first: forwarding takes longer than dispatching,
        # and the next job should not wait for it.
        self.dispatch()
        if row is not None:
            self.forward(row.id)

    def on_failure(self, task_id: str, exc: BaseException | None) -> None:
        """An attempt failed: typed refusals end the job, anything else may retry."""
        retryable = not isinstance(exc, (Rejected, InvalidRequest)) or isinstance(exc, Expired)
        error = type(exc).__name__ if exc is not None else "UnknownFailure"
        with self.sessions.begin() as session:
            row = settlement.fail_attempt(session, self.settings, task_id, error, str(exc), retryable, time.time())
        if row is not None:
            self.forward(row.id)
        self.dispatch()

    def tick(self) -> dict[str, int]:
        """Periodic duties: deadlines, lost workers, leases, dispatch."""
        now = time.time()
        herd = self.herd()
        with self.sessions.begin() as session:
            ended = settlement.expire_deadlines(session, now)
            lost = worker_loss.lost_attempts(session, self.redis, herd)
            for attempt in lost:
                row = settlement.fail_attempt(session, self.settings, attempt.task_id, "WorkerLost",
                                              "the worker running it stopped", retryable=True, now=now)
                ended += [row] if row is not None else []
            ended += settlement.reap_leases(session, self.settings, now)
            ended_ids = [row.id for row in ended]
        for attempt in lost:
            worker_loss.close_claim(self.redis, attempt)
        for job_id in ended_ids:
            self.forward(job_id)
        return {"ended": len(ended_ids), "dispatched": self.dispatch()}

    # --- forwarding ---------------------------------------------------------------

    def forward(self, job_id: str) -> None:
        """Deliver a final job's response to each of its channels, at most once each."""
        with self.sessions.begin() as session:
            row = session.scalar(select(JobRow).where(JobRow.id == job_id))
            if row is None or row.state not in FINAL_STATES:
                return
            response = settlement.response(row)
            todo = [c for c in forwarding.channels(row) if forwarding.take(session, job_id, c)]
            callback = (row.callback_task, row.callback_queue)
            times = (row.created_at, row.dispatched_at, row.finished_at)
        if forwarding.HANDLE in todo:
            forwarding.to_handle(self.redis, response, self.settings.response_ttl_s)
            # The handle channel is taken exactly once per job: count the outcome here.
            metrics.record_outcome(self.redis, response, *times)
        if forwarding.CALLBACK in todo and callback[0]:
            self._send_callback(callback[0], callback[1] or "celery", response)
        if forwarding.WEBHOOK in todo:
            self._send_webhook(job_id)

    def webhook_target(self, job_id: str) -> tuple[str, str, dict[str, Any]]:
        """URL, secret and response of a job's webhook delivery."""
        with self.sessions.begin() as session:
            row = session.scalar(select(JobRow).where(JobRow.id == job_id))
            if row is None or not row.webhook_url:
                raise UnknownJob(job_id)
            account = session.get(ledger.Account, row.account_id)
            assert account is not None
            return row.webhook_url, account.webhook_secret, settlement.response(row)

    # --- Info -------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        herd = self.herd()
        slots = dispatch.capacity(herd)
        now = time.time()
        with self.sessions.begin() as session:
            queued = admission.queued_count(session)
            last = session.scalar(select(JobRow.bid_ppm).order_by(JobRow.seq.desc()).limit(1))
            running = session.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == RUNNING)) or 0
            recent = list(session.execute(
                select(JobRow.finished_at, JobRow.dispatched_at)
                .where(JobRow.state == DONE).order_by(JobRow.seq.desc()).limit(DURATION_SAMPLE)
            ))
            durations = [f - d for f, d in recent if f is not None and d is not None]
            job_s = sum(durations) / len(durations) if durations else None
            total_slots = sum(slots.values())
            table = []
            for m in DISCOVERY_MULTIPLIERS:
                p = admission.priority(int(m * fees.PPM), now, self.settings.aging_per_s)
                ahead = session.scalar(
                    select(func.count()).select_from(JobRow).where(JobRow.state == QUEUED, JobRow.priority >= p)
                ) or 0
                wait = None
                if job_s is not None and total_slots:
                    # Jobs ahead drain through every slot; a full herd frees one slot per job_s/slots.
                    wait = math.ceil((ahead + max(0, running - total_slots + 1)) / total_slots) * job_s
                table.append({"multiplier": m, "position": ahead + 1, "expected_wait_s": wait})
        # One job may hold one slot's context: prompt + max_tokens (× n choices, each in its own slot).
        models = [{"name": s.name, "id": s.model_id, "slots": slots.get(s.name, 0),
                   "context_per_job": self.settings.n_ctx}
                  for s in self.counter.models().values()]
        return {
            "name": self.settings.service_name,
            "version": _version(),
            "base_fee": self.settings.base_fee,
            "fee_per_token": self.settings.fee_per_token,
            "fee_per_cached_token": self.settings.cached_token_fee,
            "last_multiplier": (last / fees.PPM) if last is not None else None,
            "queue_length": queued,
            "running": running,
            "models": models,
            "herd": [{k: w.get(k) for k in ("worker", "model", "slots", "busy", "gpus", "n_ctx")} for w in herd],
            "price_discovery": table,
            "pid": os.getpid(),
        }


_service: HerderService | None = None
_service_pid = 0


def get_service(factory: Callable[[HerderSettings], HerderService]) -> HerderService:
    """This process's service, built on first use (and again after a fork)."""
    global _service, _service_pid
    if _service is None or _service_pid != os.getpid():
        _service, _service_pid = factory(get_settings()), os.getpid()
    return _service
