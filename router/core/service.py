"""The herder's operations as plain methods: what the Celery tasks and the
HTTP gateway call.

``HerderService`` is built from its parts (``router.core.parts``): a session
factory, a token counter, the signing key, the house workers' public key, a
Redis client, a transport, a forwarder, a herd source and a clock. Its constructor only stores them;
``router.herder.wiring.build`` makes the real ones for a process (migrating the
ledger and loading the key), ``router.herder.stub`` makes in-process ones.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from llama_tasks import claims, faults, signing
from llama_tasks.constants import CANCEL_PREFIX
from llama_tasks.errors import Expired, InvalidRequest, LlamasError, Rejected
from llama_tasks.result import attempt_of
from router.core import (
    admission,
    broker_access,
    db,
    dispatch,
    forwarding,
    herd_control,
    info,
    ledger,
    limits,
    metrics,
    placement,
    placement_store,
    provenance,
    queue,
    receipts,
    retention,
    settlement,
    views,
    worker_loss,
)
from router.core.dispatch import Order
from router.core.errors import JobNotQueued, UnknownJob, UnknownModelId, UnknownWorker
from router.core.models import QUEUED, RUNNING, JobRow
from router.core.parts import Clock, Forwarder, HerdSource, TokenCounting, Transport
from router.core.request import Submission
from router.core.settings import HerderSettings

log = logging.getLogger(__name__)

#: A running attempt with no settled result after this long is looked up in the
#: result store by the tick (its result may never have reached a herder: one
#: that had read it from the results stream was killed, say).
RECONCILE_AFTER_S = 5.0


class HerderService:
    """The herder's state for one process and everything it can do."""

    def __init__(self, settings: HerderSettings, *, sessions: sessionmaker[Session], counter: TokenCounting,
                 key: Ed25519PrivateKey, redis_client: redis.Redis, transport: Transport, forwarder: Forwarder,
                 herd: HerdSource, house_key: Ed25519PublicKey | None, clock: Clock = time.time,
                 read_sessions: sessionmaker[Session] | None = None) -> None:
        self.settings = settings
        self.sessions = sessions
        #: For transactions that only read (on SQLite they take no write lock).
        self.read_sessions = read_sessions or sessions
        self.counter = counter
        self.redis = redis_client
        #: Every account's requests- and tokens-per-minute windows (``router.core.limits``).
        self.windows = limits.Windows(redis_client)
        self.transport = transport
        self.forwarder = forwarder
        self._key = key
        #: What results are checked against (``router.core.provenance``).
        self.provenance = provenance.Keys(key, house_key)
        self._herd = herd
        self._clock = clock

    # --- requests -------------------------------------------------------------

    def submit(self, api_key: str, sub: Submission) -> dict[str, Any]:
        """Admit a request (or return the job its reference already names) and dispatch.

        The one admission path of the gateway, the client and the CLI: the same
        checks in the same order, everything but the money before the write
        transaction opens (so SQLite's single writer is held only for the hold).
        """
        return self.submit_counted(api_key, sub)[0]

    def submit_counted(self, api_key: str, sub: Submission) -> tuple[dict[str, Any], limits.Usage | None]:
        """``submit``, and where the account's minute windows stand after counting this admission (None
        for a job its reference already named: nothing was counted) — the gateway's ``x-ratelimit-*``
        headers, without a second transaction to read them."""
        try:
            # Fields, channels, vocabulary and context (``price`` runs every check but the money).
            priced = admission.price(self.settings, self.counter, sub)
            # A worker that has just started may be newer than the cached herd: look again before refusing.
            slots = (dispatch.capacity(self._herd()).get(sub.model, 0)
                     or dispatch.capacity(self._herd(fresh=True)).get(sub.model, 0))
            served = slots > 0 or self._placeable(sub.model)
            try:
                doc, orders, usage = self._admit(api_key, sub, priced, slots, served)
            except IntegrityError:
                # A concurrent submit with the same reference won the insert.
                doc, orders, usage = self._admit(api_key, sub, priced, slots, served)
        except LlamasError as exc:
            self.refused(exc)
            raise
        faults.point("admitted")
        self._send_all(orders)
        if doc["state"] == QUEUED:
            self._claim_again({sub.model})
        return doc, usage

    def _admit(self, api_key: str, sub: Submission, priced: admission.Priced,
               slots: int, served: bool) -> tuple[dict[str, Any], list[Order], limits.Usage | None]:
        """One transaction: hold and queue the job, and start it at once if its model has a free slot."""
        now = self._clock()
        # A commit that fails gives back the place the admission took in the account's minute windows.
        with limits.reserve(self.windows) as windows, self.sessions.begin() as session:
            row, created = admission.admit(session, self.settings, priced, api_key, sub, now, served=served,
                                           windows=windows)
            orders = self._claim(session, sub.model, slots, now) if created else []
            return views.describe_row(session, row), orders, windows.usage

    def _placeable(self, model: str) -> bool:
        """Whether demand placement may yet give ``model`` a worker: one live worker can hold it."""
        if self.settings.placement != "demand":
            return False
        with self.read_sessions.begin() as session:
            herd = [broker_access.within_reach(session, doc) for doc in self._herd()]
        return placement.could_serve(herd, model, self.counter.model_id(model), self._clock())

    def rate_limits(self, api_key: str) -> limits.Usage:
        """Where the key's account stands in its requests- and tokens-per-minute windows (``x-ratelimit-*``)."""
        with self.read_sessions.begin() as session:
            account = ledger.account_by_key(session, api_key)
            own = limits.of(session, self.settings, account.id)
            window = limits.window_id(account)
        return self.windows.usage(window, own, self._clock())

    def refused(self, exc: LlamasError) -> None:
        """Count a refusal by its reason, for the metrics."""
        try:
            metrics.inc(self.redis, "refusals", label=type(exc).__name__)
        except redis.RedisError:
            log.warning("could not count a refusal: Redis is unavailable")

    def quote(self, sub: Submission) -> dict[str, Any]:
        """What ``sub`` would cost, counted exactly as admission counts it."""
        priced = admission.price(self.settings, self.counter, sub)
        if priced.embedding:
            return {"model": sub.model, "prompt_tokens": priced.prompt_tokens, "inputs": len(sub.input or []),
                    "base_fee": self.settings.base_fee,
                    "fee_per_embedding_token": self.settings.fee_per_embedding_token, "quote": priced.quote}
        return {
            "model": sub.model,
            "prompt_tokens": priced.prompt_tokens,
            "max_tokens": sub.max_tokens,
            "n": sub.n,
            "base_fee": self.settings.base_fee,
            "fee_per_token": self.settings.fee_per_token,
            "fee_per_cached_token": self.settings.cached_token_fee,
            "quote": priced.quote,
        }

    def status(self, api_key: str, job_id: str) -> dict[str, Any]:
        with self.read_sessions.begin() as session:
            row = views.owned(session, api_key, job_id)
            return views.describe_row(session, row)

    def receipt(self, api_key: str, job_id: str) -> dict[str, Any]:
        """The signed receipt of one of the key's account's ended jobs (``router.core.receipts``).

        Another account's job is ``UnknownJob``, as in ``status``; an open one
        is ``JobNotFinished``; a job whose row and ledger disagree is
        ``ReceiptMismatch`` and gets no signature.
        """
        with self.read_sessions.begin() as session:
            row = views.owned(session, api_key, job_id)
            payload = receipts.build(session, row, issued_at=self._clock())
        return signing.sign(payload, self._key)

    def cancel(self, api_key: str, job_id: str) -> dict[str, Any]:
        """Cancel a job: a queued one ends now with a full refund; a running one
        stops at the worker's next step and is charged for what it generated."""
        try:
            with self.sessions.begin() as session:
                account = ledger.account_by_key(session, api_key)
                delivery = forwarding.pending(settlement.cancel(session, account, job_id, self._clock()))
        except JobNotQueued as exc:
            if exc.state != RUNNING:
                raise
            self.redis.set(CANCEL_PREFIX + job_id, 1, ex=int(self.settings.lease_s) + 60)
            return self.describe(job_id)
        self._deliver([delivery])
        return self.describe(job_id)

    def raise_bid(self, api_key: str, job_id: str, fee: int | None, multiplier: float | None) -> dict[str, Any]:
        with self.sessions.begin() as session:
            account = ledger.account_by_key(session, api_key)
            settlement.raise_bid(session, self.settings, account, job_id, fee, multiplier)
            return views.describe(session, job_id)

    def jobs(self, api_key: str, limit: int = 20) -> list[dict[str, Any]]:
        """The account's most recent jobs, newest first."""
        with self.read_sessions.begin() as session:
            return views.recent(session, api_key, limit)

    def describe(self, job_id: str) -> dict[str, Any]:
        """A job's public state: position while queued, the response once final."""
        with self.read_sessions.begin() as session:
            row = session.scalar(select(JobRow).where(JobRow.id == job_id))
            if row is None:
                raise UnknownJob(job_id)
            return views.describe_row(session, row)

    @property
    def public_key(self) -> Ed25519PublicKey:
        """What workers verify this herder's envelopes with."""
        return self._key.public_key()

    # --- the herd ---------------------------------------------------------------

    def herd(self) -> list[dict[str, Any]]:
        return self._herd()

    def _send(self, row: JobRow, envelope: dict[str, Any]) -> None:
        if row.attempt > 1:
            metrics.inc(self.redis, "redeliveries")
        self.transport.send(row, envelope)
        faults.point("sent")
        # A claimed attempt the herder died before sending is sent again by the tick (``resend_unsent``).
        dispatch.mark_sent(self.redis, row, self.settings.lease_s)

    def resend_unsent(self) -> int:
        """Send again the attempts claimed for dispatch whose message was never sent
        (their herder died between the claim and the send); returns how many."""
        with self.read_sessions.begin() as session:
            rows = dispatch.unsent(session, self.redis, self._clock())
            orders = dispatch.orders(rows, self._key)
        for row, envelope in orders:
            log.warning("job %s attempt %d was claimed but never sent: sending it now", row.id, row.attempt)
            self._send(row, envelope)
        return len(orders)

    def dispatch(self) -> int:
        return dispatch.dispatch(self.sessions, self.settings, self._herd(), self._key, self._send, self._clock())

    def _claim(self, session: Session, model: str, slots: int, now: float) -> list[Order]:
        """Claim ``model``'s next jobs for its free slots in the caller's transaction."""
        return dispatch.orders(queue.claim(session, self.settings, model, slots, now), self._key)

    def _claim_again(self, models: set[str]) -> None:
        """Claim for ``models`` once more, after a commit that left a slot free or a job queued (PostgreSQL).

        Claims there take no common lock, so a claim cannot see a slot or a job
        that a concurrent transaction has not yet committed; whichever of the
        two commits last claims again and sees both. (SQLite's claims follow
        one another: the later one sees the earlier.)
        """
        if not models or self.sessions.kw["bind"].dialect.name != "postgresql":
            return
        herd = [worker for worker in self._herd() if worker.get("model") in models]
        dispatch.dispatch(self.sessions, self.settings, herd, self._key, self._send, self._clock())

    def _send_all(self, orders: list[Order]) -> None:
        for row, envelope in orders:
            self._send(row, envelope)

    def on_result(self, task_id: str, doc: dict[str, Any]) -> None:
        """Settle a completed attempt; ``task_id`` is the one the herder chose for it."""
        self.on_results([(task_id, doc)])

    def on_results(self, results: list[tuple[str, dict[str, Any]]]) -> int:
        """Settle completed attempts in one transaction; returns how many were current.

        A batch whose transaction fails (one result the database refuses,
        say) is settled again one result at a time, so one bad result never
        holds up the others. What was settled is sent on after the commit.
        """
        try:
            deliveries, orders, idle = self._settle(results)
        except Exception:
            if len(results) == 1:
                raise
            log.warning("a batch of %d results failed to settle together; settling them one by one", len(results))
            deliveries, orders, idle = [], [], set()
            for one in results:
                try:
                    settled, claimed, left = self._settle([one])
                except Exception as exc:  # logged by type: a result may quote its text
                    log.error("result for task %s not settled: %s", one[0], type(exc).__name__)
                    continue
                deliveries += settled
                orders += claimed
                idle |= left
        # Feed the freed slots first: forwarding takes longer than dispatching,
        # and the next jobs should not wait for it.
        faults.point("settled")
        self._send_all(orders)
        self._claim_again(idle)
        self._deliver(deliveries)
        return len(deliveries)

    def _settle(self, results: list[tuple[str, dict[str, Any]]]
                ) -> tuple[list[forwarding.Delivery], list[Order], set[str]]:
        """One transaction: charge each current attempt, claim its channels and its slot's next job;
        also returns the models whose freed slots it started nothing in."""
        now = self._clock()
        slots = dispatch.capacity(self._herd())
        deliveries: list[forwarding.Delivery] = []
        orders: list[Order] = []
        models: set[str] = set()
        # The claim of each attempt, in one read: whose result it is to pay for (``core.provenance``).
        held = claims.holders(self.redis, [attempt_of(doc) for _, doc in results])
        with self.sessions.begin() as session:
            for (task_id, doc), claim in zip(results, held, strict=True):
                # The task id is the herder's own choice: a document signed for any other no longer verifies.
                row = settlement.settle(session, self.settings, self.counter, self.provenance,
                                        doc | {"task_id": task_id}, now, claim)
                if row is not None:
                    deliveries.append(forwarding.pending(row))
                    models.add(row.model)
            idle = set()
            for model in sorted(models):
                claimed = self._claim(session, model, slots.get(model, 0), now)
                orders += claimed
                if not claimed:
                    idle.add(model)
        return deliveries, orders, idle

    def on_failure(self, task_id: str, exc: BaseException | None) -> None:
        """An attempt failed: typed refusals end the job, anything else may retry."""
        retryable = not isinstance(exc, (Rejected, InvalidRequest)) or isinstance(exc, Expired)
        error = type(exc).__name__ if exc is not None else "UnknownFailure"
        with self.sessions.begin() as session:
            row = settlement.fail_attempt(session, self.settings, task_id, error, str(exc), retryable,
                                          self._clock())
            deliveries = [forwarding.pending(row)] if row is not None else []
        self._deliver(deliveries)
        self.dispatch()

    def tick(self) -> dict[str, int]:
        """Periodic duties: results that never reached a herder, deadlines, lost workers, leases, dispatch."""
        settled = self.reconcile()
        now = self._clock()
        herd = self._herd()
        with self.sessions.begin() as session:
            ended = settlement.expire_deadlines(session, now)
            lost = worker_loss.lost_attempts(session, self.redis, herd)
            for attempt in lost:
                row = settlement.fail_attempt(session, self.settings, attempt.task_id, "WorkerLost",
                                              "the worker running it stopped", retryable=True, now=now)
                ended += [row] if row is not None else []
            ended += settlement.reap_leases(session, self.settings, now)
            deliveries = [forwarding.pending(row) for row in ended]
            # Responses whose deliverer died before delivering them (``router.core.forwarding``).
            owed = forwarding.due(session, now)
        for attempt in lost:
            worker_loss.close_claim(self.redis, attempt)
        self._deliver(deliveries + owed)
        done = {"settled": settled, "ended": len(deliveries), "redelivered": len(owed),
                "resent": self.resend_unsent()}
        if self.settings.placement == "demand":
            done["placed"] = len(self.place())
        return done | {"dispatched": self.dispatch()}

    def place(self) -> list[placement.Move]:
        """Re-initialise workers towards the models whose queue waits (``router.core.placement``).

        One herder at a time (a short Redis lock): the others skip this
        tick's placement. Each Init is signed with this herder's key, and
        each decision logged with its reason and kept for the dashboard.
        Returns the moves whose Init was sent.
        """
        try:
            with placement_store.turn(self.redis) as mine:
                return self._place() if mine else []
        except redis.RedisError as exc:  # the tick's other duties go on; placement tries again next tick
            log.warning("placement skipped: Redis is unavailable (%s)", type(exc).__name__)
            return []

    def _place(self) -> list[placement.Move]:
        now = self._clock()
        herd = self._herd(fresh=True)
        models = self.counter.models()
        with self.read_sessions.begin() as session:
            wanted = placement.demand(session, now)
            # No Init may move an operator's worker to a queue its broker user cannot take.
            herd = [broker_access.within_reach(session, doc) for doc in herd]
        on_the_way = placement_store.pending(self.redis, herd, now)
        decided = placement.plan(herd, wanted, now, self.settings,
                                 {name: spec.model_id for name, spec in models.items()}, on_the_way)
        for model in placement_store.note_waiting(self.redis, decided.waiting):
            log.info("placement: %s waits: %s", model, decided.waiting[model])
        sent = []
        for move in decided.moves:
            try:
                _, nonce = herd_control.init(self.redis, self._key, herd, models, move.worker, move.to_model, now)
            except (UnknownWorker, UnknownModelId) as exc:
                log.warning("placement: no Init for %s: %s", move.worker, exc)
                continue
            placement_store.record(self.redis, move, nonce, now)
            log.info("placement: %s from %s to %s (Init %s): %s", move.worker, move.from_model or "no model",
                     move.to_model, nonce, move.reason)
            sent.append(move)
        return sent

    def reconcile(self) -> int:
        """Settle running attempts whose outcome is already stored but never
        reached a herder (the one that had read it died, say); returns how many."""
        cutoff = self._clock() - RECONCILE_AFTER_S
        with self.read_sessions.begin() as session:
            task_ids = list(session.scalars(
                select(JobRow.task_id).where(JobRow.state == RUNNING, JobRow.dispatched_at < cutoff)))
        found = self.transport.stored_results(t for t in task_ids if t)
        for task_id, stored in found.items():
            if stored.state == "done" and stored.document is not None:
                self.on_result(task_id, stored.document)
            else:
                self.on_failure(task_id, stored.error)
        return len(found)

    def erase_text(self, result_key: Callable[[str], str]) -> int:
        """Erase the text of jobs whose delivery and retention are over (``router.core.retention``).

        ``result_key`` names a task's entry in the result store, whose copy goes too.
        """
        erased = retention.run(self.sessions, self.redis, self.settings.text_kept_s, self._clock(), result_key)
        if erased:
            db.truncate_wal(self.sessions)  # old page versions in SQLite's log still hold the text
        return erased

    # --- forwarding ---------------------------------------------------------------

    def _deliver(self, deliveries: list[forwarding.Delivery]) -> None:
        """Deliver responses whose jobs have ended (and committed), then record them delivered.

        A delivery that fails (Redis away, say) stays due: the tick tries it
        again. Each job's outcome is counted in the metrics by whoever records
        its delivery first, so a delivery made twice is counted once.
        """
        done = []
        for delivery in deliveries:
            try:
                forwarding.deliver(self.forwarder, delivery)
            except Exception as exc:  # logged by type: a response holds the completion
                log.warning("job %s not delivered yet (%s); the tick tries again", delivery.job_id,
                            type(exc).__name__)
                continue
            done.append(delivery)
        if not done:
            return
        faults.point("delivered")
        with self.sessions.begin() as session:
            first = [d for d in done if forwarding.mark(session, d)]
        faults.point("marked")
        for delivery in first:
            if forwarding.HANDLE in delivery.channels:
                try:
                    metrics.record_outcome(self.redis, delivery.response, *delivery.times)
                except redis.RedisError:
                    log.warning("could not count job %s's outcome: Redis is unavailable", delivery.job_id)

    def webhook_target(self, job_id: str) -> tuple[str, str, dict[str, Any]]:
        """URL, secret and response of a job's webhook delivery."""
        with self.read_sessions.begin() as session:
            return forwarding.webhook_target(session, job_id)

    # --- Info -------------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        herd = self._herd()
        with self.read_sessions.begin() as session:
            return info.describe(session, self.settings, self.counter, herd, self._clock())

    def ping_ledger(self) -> None:
        """Raise if the ledger does not answer."""
        with self.read_sessions() as session:
            session.execute(text("SELECT 1"))


_service: HerderService | None = None
_service_pid = 0


def get_service(factory: Callable[[], HerderService]) -> HerderService:
    """This process's service, built on first use (and again after a fork)."""
    global _service, _service_pid
    if _service is None or _service_pid != os.getpid():
        _service, _service_pid = factory(), os.getpid()
    return _service
