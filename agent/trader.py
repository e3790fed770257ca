"""The trading agent: tick → ChatHistory → paid grade → Inference-Response → Create-Order.

Plain methods over the world, the herder client, the outcome store and the
exchange; the Celery tasks in ``agent.app`` only call them. Every step logs
one line: TICK, REQUEST, RESPONSE, BUY, SKIP, ERROR, DUPLICATE.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from agent import strategy
from agent.constants import RESPONSE_TASK
from agent.exchange import ActionResponse, Exchange
from agent.grading import GradingRequest, Method
from agent.scoring import Calibration
from agent.settings import AgentSettings
from agent.store import REQUESTED, SUBMITTING, OutcomeStore, Summary, Tick
from agent.strategy import BUY, ERROR, Verdict
from agent.world import World
from router.client import Herder

log = logging.getLogger("agent")


@dataclass(frozen=True)
class Status:
    """Everything ``llamas agent status`` shows."""

    summary: Summary
    balances: dict[str, int]
    recent: list[Tick]


class Trader:
    """The sentiment-trading agent of one room."""

    def __init__(self, settings: AgentSettings, herder: Herder, world: World, store: OutcomeStore,
                 exchange: Exchange, method: Method, calibration: Calibration = None) -> None:
        self.settings = settings
        self.herder = herder
        self.world = world
        self.store = store
        self.exchange = exchange
        self.method = method
        #: The method's calibration for the model (``grading.shipped_calibration``).
        self.calibration = calibration
        self.room = settings.agent_room

    # --- the tick ---------------------------------------------------------------

    def tick(self, tick_id: str, now: float | None = None) -> Tick | None:
        """One beat: grade the room's last messages if there is something new to grade.

        Called again with the same ``tick_id`` (a redelivered or retried task),
        it resubmits the recorded request under the same reference, which the
        herder answers with the same job: one tick never pays twice.
        """
        now = time.time() if now is None else now
        self._expire_stale(now)
        tick = self.store.get(tick_id)
        if tick is None:
            stuck = self.store.in_flight(self.room)
            if stuck is not None and stuck.state == SUBMITTING:
                # Its own task gave up (the herder did not answer): finish it, same reference.
                log.info("TICK     resubmitting tick %s", stuck.id)
                tick = stuck
            else:
                tick = self._begin(tick_id, now)
            if tick is None:
                return None
        if tick.state != SUBMITTING:
            log.info("TICK     %s already %s; nothing to do", tick.id, tick.state)
            return tick
        self._submit(tick)
        return self.store.get(tick.id)

    def _expire_stale(self, now: float) -> None:
        timeout_s = self.settings.agent_response_timeout_s
        for tick_id in self.store.expire_stale(now - timeout_s, f"no response within {timeout_s:.0f}s", now):
            log.warning("ERROR    tick %s: no response within %.0fs", tick_id, timeout_s)

    def _begin(self, tick_id: str, now: float) -> Tick | None:
        history = self.world.history(self.room, self.settings.agent_history_n)
        open_tick = self.store.in_flight(self.room)
        waiting = None if open_tick is None else (open_tick.job_id or "being submitted")
        reason = strategy.why_not_grade(history, self.store.last_graded_id(self.room), waiting)
        if reason is not None:
            log.info("TICK     %s: %s", self.room, reason)
            return None
        request = self.method.build(history)
        log.info("TICK     %s: grading the last %d message(s), up to %s (%s)", self.room, len(history),
                 history[-1].id, self.method.name)
        return self.store.begin(tick_id, self.room, strategy.reference_for(tick_id), history[-1].id,
                                request.to_json(), now)

    def _offer(self) -> dict[str, Any]:
        if self.settings.agent_fee is not None:
            return {"fee": self.settings.agent_fee}
        return {"multiplier": self.settings.agent_multiplier}

    def _submit(self, tick: Tick) -> None:
        request = GradingRequest.from_json(tick.request)
        try:
            handle = self.herder.run(
                **request.run_kwargs(), **self._offer(), model=self.settings.agent_model,
                reference=tick.reference, callback=(RESPONSE_TASK, self.settings.agent_queue),
                deadline_s=self.settings.agent_deadline_s,
            )
        except Exception as exc:
            if is_transient(exc):
                raise  # the task retries under the same tick id, hence the same reference
            self.give_up(tick.id, strategy.refusal_reason(exc))
            return
        offered = int(handle.doc.get("offered") or 0)
        self.store.requested(tick.id, handle.id, offered)
        log.info("REQUEST  job %s for %s, offered %d (ref %s)", handle.id, self.room, offered, tick.reference)

    def give_up(self, tick_id: str, reason: str, now: float | None = None) -> None:
        """End a tick that could not be submitted as an Error with ``reason``."""
        if self.store.finish(tick_id, Verdict(ERROR, None, reason), time.time() if now is None else now):
            log.warning("ERROR    tick %s: %s", tick_id, reason)

    # --- the response -----------------------------------------------------------

    def on_response(self, response: dict[str, Any], now: float | None = None) -> str | None:
        """Act on an Inference-Response once; returns the outcome, or None if nothing was done."""
        now = time.time() if now is None else now
        tick_id = strategy.tick_of(response.get("reference"))
        tick = self.store.get(tick_id) if tick_id is not None else None
        if tick_id is None or tick is None:
            log.warning("RESPONSE job %s has no tick of ours (ref %r); ignored",
                        response.get("job_id"), response.get("reference"))
            return None
        if tick.state not in (SUBMITTING, REQUESTED):
            self._duplicate(tick, response)
            return None
        verdict = strategy.judge(response, self.method, self.calibration)
        # The grade and the label probabilities, never the completion's text.
        log.info("RESPONSE job %s: %s → %s%s", response.get("job_id"), response.get("status"),
                 strategy.show_grade(verdict.grade, verdict.reading) if verdict.grade is not None else verdict.reason,
                 _probabilities(verdict))
        answer = None
        if verdict.outcome == BUY:
            # The order id is the tick's reference: a concurrent duplicate places the same order.
            answer = self.exchange.create_order(strategy.order_for(
                tick.reference, self.settings.agent_exchange_account, self.settings.agent_order_quantity,
                self.settings.agent_trade_token, self.settings.agent_quote_token))
            if not answer.filled:
                verdict = Verdict(ERROR, verdict.grade, f"order rejected: {answer.reason}")
        if not self.store.finish(tick.id, verdict, now, response, answer):
            self._duplicate(tick, response)
            return None
        self._log_outcome(verdict, response, answer)
        return verdict.outcome

    def _duplicate(self, tick: Tick, response: dict[str, Any]) -> None:
        charged = response.get("charged")
        self.store.note_duplicate(tick.id, int(charged) if isinstance(charged, int) else None)
        log.info("DUPLICATE response for job %s (tick %s, already %s); ignored",
                 response.get("job_id"), tick.id, tick.state)

    def _log_outcome(self, verdict: Verdict, response: dict[str, Any], answer: ActionResponse | None) -> None:
        paid = response.get("charged") or 0
        if verdict.outcome == BUY and answer is not None:
            log.info("BUY      %d %s for %d %s at %d (grade %s, paid %d for the grade)",
                     answer.received, self.settings.agent_trade_token, answer.spent,
                     self.settings.agent_quote_token, answer.price,
                     strategy.show_grade(verdict.grade, verdict.reading), paid)
        elif verdict.outcome == ERROR:
            log.warning("ERROR    job %s: %s", response.get("job_id"), verdict.reason)
        else:
            log.info("SKIP     %s (paid %d for the grade)", verdict.reason, paid)

    # --- status -------------------------------------------------------------------

    def status(self, recent: int = 5) -> Status:
        return read_status(self.store, self.exchange, self.settings.agent_exchange_account, recent)


def _probabilities(verdict: Verdict) -> str:
    """`` (positive 0.81, negative 0.04, neutral 0.15)`` for a calibrated reading, else nothing."""
    q = verdict.reading.calibrated if verdict.reading is not None else None
    return "" if q is None else " (" + ", ".join(f"{label} {p:.2f}" for label, p in q.items()) + ")"


def read_status(store: OutcomeStore, exchange: Exchange, account: str, recent: int = 5) -> Status:
    """The outcomes so far, the exchange position and the latest ticks."""
    return Status(store.summary(), exchange.balances(account), store.recent(recent))


def is_transient(exc: BaseException) -> bool:
    """Whether a failed submit may succeed if retried: no answer, or no connection."""
    import celery.exceptions
    import kombu.exceptions
    import redis

    return isinstance(exc, (celery.exceptions.TimeoutError, kombu.exceptions.OperationalError,
                            redis.ConnectionError, redis.TimeoutError, ConnectionError, TimeoutError))
