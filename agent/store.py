"""The agent's durable record: one row per tick, from its request to its outcome.

A tick is written (with the exact request it will pay for) *before* the
herder is asked, so a redelivered tick reuses the same reference and request
and the herder returns the same job instead of taking a second payment. A
tick ends exactly once — Buy, Skip or Error — by a conditional update; a
duplicated response finds it ended and only counts as a duplicate.

A probability grade also keeps its expected value and the label
distribution before and after calibration (``agent_grades``, one row per
graded tick, written in the transaction that ends the tick).

Schema: ``metadata.create_all`` on the agent's own database (idempotent; the
grades are their own table so a database made before them gains it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import BigInteger, Float, Integer, String, Text, func, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from agent.db import make_engine, make_sessionmaker
from agent.exchange import ActionResponse
from agent.strategy import BUY, ERROR, SKIP, Verdict

SUBMITTING, REQUESTED = "submitting", "requested"
OPEN_STATES = (SUBMITTING, REQUESTED)
FINAL_STATES = (BUY, SKIP, ERROR)


class AgentBase(DeclarativeBase):
    """Declarative base of the agent's own tables."""


class Tick(AgentBase):
    """One tick of the agent: what it asked, what it paid, what it did."""

    __tablename__ = "agent_ticks"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    room: Mapped[str] = mapped_column(String(64), nullable=False, index=True)
    reference: Mapped[str] = mapped_column(String(200), nullable=False, unique=True)
    #: Stream id of the newest message graded: the next tick skips an unchanged room.
    newest_message: Mapped[str] = mapped_column(String(40), nullable=False)
    request: Mapped[str] = mapped_column(Text, nullable=False)
    state: Mapped[str] = mapped_column(String(16), nullable=False, index=True)
    job_id: Mapped[str | None] = mapped_column(String(64))
    offered: Mapped[int | None] = mapped_column(BigInteger)
    charged: Mapped[int | None] = mapped_column(BigInteger)
    answer: Mapped[str | None] = mapped_column(Text)
    grade: Mapped[int | None] = mapped_column(Integer)
    reason: Mapped[str | None] = mapped_column(Text)
    order_status: Mapped[str | None] = mapped_column(String(16))
    price: Mapped[int | None] = mapped_column(BigInteger)
    spent: Mapped[int | None] = mapped_column(BigInteger)
    received: Mapped[int | None] = mapped_column(BigInteger)
    duplicates: Mapped[int] = mapped_column(Integer, nullable=False, default=0)
    created_at: Mapped[float] = mapped_column(Float, nullable=False, index=True)
    finished_at: Mapped[float | None] = mapped_column(Float)


class Grade(AgentBase):
    """The probabilities behind a tick's grade (probability methods only)."""

    __tablename__ = "agent_grades"

    tick_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: The exact 1–5 grade (an expected value); ``Tick.grade`` holds it rounded, as the agent decided on it.
    expected: Mapped[float] = mapped_column(Float, nullable=False)
    #: JSON ``{"raw": {label: p}, "calibrated": {label: p}}``.
    probabilities: Mapped[str] = mapped_column(Text, nullable=False)


@dataclass(frozen=True)
class Summary:
    """The agent's outcomes so far, as ``llamas agent status`` shows them."""

    requests: int
    buy: int
    skip: int
    error: int
    in_flight: int
    spend: int
    duplicates: int
    spent_on_orders: int
    bought: int
    #: Ticks that got a grade (Buy or Skip, or an order rejected after one).
    graded: int = 0

    @property
    def cost_per_grade(self) -> int | None:
        """Everything paid to the herder per grade received, rounded to the smallest unit."""
        return (self.spend + self.graded // 2) // self.graded if self.graded else None


class OutcomeStore:
    """Ticks and their outcomes in the agent's database (SQLite or PostgreSQL)."""

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    @classmethod
    def open(cls, url: str) -> OutcomeStore:
        engine = make_engine(url)
        AgentBase.metadata.create_all(engine)
        return cls(make_sessionmaker(engine))

    def close(self) -> None:
        bind = self.sessions.kw.get("bind")
        if bind is not None:
            bind.dispose()

    # --- reading ----------------------------------------------------------------

    def get(self, tick_id: str) -> Tick | None:
        with self.sessions() as session:
            return session.get(Tick, tick_id)

    def in_flight(self, room: str) -> Tick | None:
        """The room's open tick, if one is still waiting for its response."""
        with self.sessions() as session:
            return session.scalar(select(Tick).where(Tick.room == room, Tick.state.in_(OPEN_STATES))
                                  .order_by(Tick.created_at.desc()).limit(1))

    def last_graded_id(self, room: str) -> str | None:
        """Newest message of the room's last paid tick: refusals (nothing paid) are tried again."""
        with self.sessions() as session:
            return session.scalar(select(Tick.newest_message).where(Tick.room == room, Tick.job_id.is_not(None))
                                  .order_by(Tick.created_at.desc()).limit(1))

    def recent(self, limit: int = 10) -> list[Tick]:
        with self.sessions() as session:
            return list(session.scalars(select(Tick).order_by(Tick.created_at.desc()).limit(limit)))

    def summary(self) -> Summary:
        with self.sessions() as session:
            def count(*where: Any) -> int:
                return session.scalar(select(func.count()).select_from(Tick).where(*where)) or 0

            def total(column: Any) -> int:
                return int(session.scalar(select(func.coalesce(func.sum(column), 0))) or 0)

            return Summary(
                requests=count(Tick.job_id.is_not(None)),
                buy=count(Tick.state == BUY), skip=count(Tick.state == SKIP), error=count(Tick.state == ERROR),
                in_flight=count(Tick.state.in_(OPEN_STATES)),
                spend=total(Tick.charged), duplicates=total(Tick.duplicates),
                spent_on_orders=total(Tick.spent), bought=total(Tick.received),
                graded=count(Tick.grade.is_not(None)),
            )

    def grade_of(self, tick_id: str) -> Grade | None:
        """The probabilities behind a tick's grade, if a probability method graded it."""
        with self.sessions() as session:
            return session.get(Grade, tick_id)

    # --- writing ------------------------------------------------------------------

    def begin(self, tick_id: str, room: str, reference: str, newest_message: str, request: str,
              now: float) -> Tick:
        """Record a tick about to pay for ``request``; the existing row if it was recorded before."""
        try:
            with self.sessions.begin() as session:
                tick = Tick(id=tick_id, room=room, reference=reference, newest_message=newest_message,
                            request=request, state=SUBMITTING, duplicates=0, created_at=now)
                session.add(tick)
            return tick
        except IntegrityError:
            found = self.get(tick_id)
            assert found is not None
            return found

    def requested(self, tick_id: str, job_id: str, offered: int) -> None:
        """The herder admitted the tick's request as ``job_id``."""
        with self.sessions.begin() as session:
            # A fast response may have ended the tick already: only fill what is missing.
            session.execute(update(Tick).where(Tick.id == tick_id, Tick.job_id.is_(None)).values(job_id=job_id))
            session.execute(update(Tick).where(Tick.id == tick_id, Tick.offered.is_(None)).values(offered=offered))
            session.execute(update(Tick).where(Tick.id == tick_id, Tick.state == SUBMITTING)
                            .values(state=REQUESTED))

    def finish(self, tick_id: str, verdict: Verdict, now: float, response: dict[str, Any] | None = None,
               answer: ActionResponse | None = None) -> bool:
        """End a tick with its outcome; False if it had already ended (a duplicate)."""
        values: dict[str, Any] = {"state": verdict.outcome, "grade": verdict.grade,
                                  "reason": verdict.reason or None, "finished_at": now}
        if response is not None:
            values |= {"job_id": response.get("job_id"), "charged": int(response.get("charged") or 0),
                       "answer": response.get("text"), "offered": response.get("offered")}
        if answer is not None:
            values |= {"order_status": answer.status, "price": answer.price or None,
                       "spent": answer.spent, "received": answer.received}
        with self.sessions.begin() as session:
            ended = cast("CursorResult[Any]", session.execute(
                update(Tick).where(Tick.id == tick_id, Tick.state.in_(OPEN_STATES)).values(**values)
                .execution_options(synchronize_session=False))).rowcount
            reading = verdict.reading
            if ended and reading is not None and reading.calibrated is not None:
                session.add(Grade(tick_id=tick_id, expected=float(reading.grade), probabilities=json.dumps(
                    {"raw": reading.raw, "calibrated": reading.calibrated}, sort_keys=True)))
        return bool(ended)

    def note_duplicate(self, tick_id: str, charged: int | None) -> None:
        """Count a response for an ended tick; keep its charge if the tick had none (a late answer)."""
        with self.sessions.begin() as session:
            session.execute(update(Tick).where(Tick.id == tick_id).values(duplicates=Tick.duplicates + 1))
            if charged is not None:
                session.execute(update(Tick).where(Tick.id == tick_id, Tick.charged.is_(None))
                                .values(charged=charged))

    def expire_stale(self, before: float, reason: str, now: float) -> list[str]:
        """End as Error every open tick created before ``before``; returns their ids."""
        with self.sessions.begin() as session:
            ids = list(session.scalars(select(Tick.id).where(Tick.state.in_(OPEN_STATES), Tick.created_at < before)))
            if ids:
                session.execute(update(Tick).where(Tick.id.in_(ids), Tick.state.in_(OPEN_STATES))
                                .values(state=ERROR, reason=reason, finished_at=now))
        return ids
