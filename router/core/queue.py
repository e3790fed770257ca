"""The fee market's queue: how waiting jobs are ordered, where one stands, and how the best are claimed.

Jobs of a model leave the queue by ``priority`` (highest first), then in
arrival order (``seq``). ``priority`` is the bid plus aging, stored once per
job because it is time-invariant (see ``priority``); an index on
``(model, state, priority, seq)`` serves every query here.
"""

from __future__ import annotations

import functools
import uuid
from typing import Any

from sqlalchemy import ColumnElement, Connection, and_, bindparam, case, func, or_, select, text, update
from sqlalchemy.orm import Session

from router.core import fees
from router.core.models import QUEUED, RUNNING, AccountLimits, JobRow, ModelSlot
from router.core.settings import HerderSettings

#: First key of the PostgreSQL advisory lock a claim holds on an account whose jobs it may start.
ACCOUNT_LOCK_NS = 0x636C6163  # "clac"
#: The order queued jobs leave in: best priority first, first come first served among equals.
ORDER: tuple[Any, ...] = (JobRow.priority.desc(), JobRow.seq)


def priority(bid_ppm: int, created_at: float, aging_per_s: float) -> float:
    """Ordering key, higher first: the bid, plus aging that favours earlier arrivals.

    ``bid + aging × (t − created_at)`` ranks jobs the same at every ``t``, so
    the time-invariant part ``bid − aging × created_at`` can be stored once.
    """
    return bid_ppm / fees.PPM - aging_per_s * created_at


def _before(row: JobRow) -> ColumnElement[bool]:
    """Queued jobs that leave before ``row`` (same model)."""
    return and_(
        JobRow.model == row.model,
        JobRow.state == QUEUED,
        or_(JobRow.priority > row.priority, and_(JobRow.priority == row.priority, JobRow.seq < row.seq)),
    )


def position(session: Session, row: JobRow) -> int:
    """1 + the queued jobs of the same model that go before this one."""
    return (session.scalar(select(func.count()).select_from(JobRow).where(_before(row))) or 0) + 1


def at_least(session: Session, key: float) -> int:
    """Queued jobs (any model) whose priority is ``key`` or better: what a new job with ``key`` waits behind."""
    return session.scalar(
        select(func.count()).select_from(JobRow).where(JobRow.state == QUEUED, JobRow.priority >= key)
    ) or 0


def queued_count(session: Session) -> int:
    return session.scalar(select(func.count()).select_from(JobRow).where(JobRow.state == QUEUED)) or 0


def running_count(session: Session, model: str) -> int:
    """Jobs of ``model`` running now."""
    return session.scalar(
        select(func.count()).select_from(JobRow).where(JobRow.model == model, JobRow.state == RUNNING)
    ) or 0


def running_sequences(session: Session, model: str) -> int:
    """Sequences of ``model`` running now: a job of ``n`` choices holds ``n`` of the herd's slots."""
    return session.scalar(
        select(func.coalesce(func.sum(JobRow.n), 0)).where(JobRow.model == model, JobRow.state == RUNNING)
    ) or 0


def _postgres(session: Session) -> bool:
    return session.get_bind().dialect.name == "postgresql"


@functools.cache
def _startable_query(guess: bool, passing: bool, postgres: bool) -> Any:
    """``_startable``'s statement, built once per shape: building one costs more than running it."""
    if guess:
        running = select(func.coalesce(func.sum(JobRow.n), 0)).where(
            JobRow.model == bindparam("p_model"), JobRow.state == RUNNING).scalar_subquery()
        free: Any = bindparam("p_slots") - running
        limit: Any = func.greatest(0, free) if postgres else func.max(0, free)
    else:
        limit = bindparam("p_count")
    query = (
        select(JobRow, AccountLimits.max_in_flight)
        .outerjoin(AccountLimits, AccountLimits.account_id == JobRow.account_id)
        .where(
            JobRow.model == bindparam("p_model"),
            JobRow.state == QUEUED,
            # Past its deadline a job is the tick's to expire and refund, not to run.
            or_(JobRow.deadline_at.is_(None), JobRow.deadline_at >= bindparam("p_now")),
        )
        .order_by(*ORDER)
        .limit(limit)
    )
    if passing:
        query = query.where(JobRow.account_id.not_in(bindparam("p_passed", expanding=True)))
    if postgres:
        query = query.with_for_update(of=JobRow, skip_locked=True)
    return query


def _startable(session: Session, model: str, now: float, passed: set[int], slots: int,
               count: int | None) -> list[tuple[JobRow, int | None]]:
    """The best queued jobs of ``model`` that may start now, leaving out accounts in ``passed``, each with
    its account's own in-flight cap; on PostgreSQL locked, skipping rows another transaction holds.

    ``count`` None: as many as the model's slots look free, counted without a lock (a guess the
    claim checks once it holds the model).
    """
    query = _startable_query(count is None, bool(passed), _postgres(session))
    params = {"p_model": model, "p_now": now, "p_slots": slots, "p_count": count, "p_passed": sorted(passed)}
    return [(row, cap) for row, cap in session.execute(query, params).tuples()]


#: ``Session.info`` key: the transaction whose claim took account locks last.
_CLAIMED_KEY = "llamas_claimed_accounts"
#: A slot row's condition of being free, on ``model_slots s LEFT JOIN jobs j ON j.seq = s.job_seq``. A slot
#: re-taken since the claim's snapshot is re-checked by PostgreSQL against the job it held then, so it reads
#: as taken (NULL), never as free.
_FREE = "(s.job_seq IS NULL OR j.state <> 'running' OR j.attempt <> s.attempt)"


def _take(session: Session, model: str, slots: int, accounts: list[int], count: int,
          wait: bool) -> tuple[set[int], list[int]]:
    """PostgreSQL: the claim locks of ``accounts`` (``wait``: waited for, lowest id first; else only those
    no other claim holds) and up to ``count`` free slots of ``model``, locked (others' skipped, never
    waited for)."""
    accounts_held = (
        "(SELECT array_agg(a) FROM (SELECT a, pg_advisory_xact_lock(:ns, a) "
        "FROM unnest(CAST(:accounts AS integer[])) AS a) AS locked)" if wait else
        "ARRAY(SELECT a FROM unnest(CAST(:accounts AS integer[])) AS a WHERE pg_try_advisory_xact_lock(:ns, a))"
    )
    held, free = session.execute(
        text(f"SELECT {accounts_held}, "
             "ARRAY(SELECT s.no FROM model_slots s LEFT JOIN jobs j ON j.seq = s.job_seq "
             f"WHERE s.model = :model AND s.no < :slots AND {_FREE} "
             "ORDER BY s.no LIMIT :count FOR UPDATE OF s SKIP LOCKED)"),
        {"accounts": sorted(accounts), "ns": ACCOUNT_LOCK_NS, "model": model, "slots": slots, "count": count},
    ).one()
    return set(held or ()), list(free)


def _make_slots(session: Session, model: str, slots: int) -> None:
    """PostgreSQL: the rows of ``model``'s slots 0 … slots − 1 that are missing (the herd grew, or is new).

    Made and committed on a connection of their own, so the claim waits (for another claim making the same
    rows) while holding nothing another claim could be waiting for.
    """
    bind = session.get_bind()
    engine = bind.engine if isinstance(bind, Connection) else bind
    with engine.begin() as connection:
        connection.execute(
            text("INSERT INTO model_slots (model, no) SELECT :model, g FROM generate_series(0, :slots - 1) AS g "
                 "ON CONFLICT DO NOTHING"), {"model": model, "slots": slots})


def _counted(session: Session, model: str, accounts: set[int],
             slot_nos: list[int]) -> tuple[dict[int, int], set[int], int]:
    """PostgreSQL, once the locks are held: the slots each of ``accounts`` holds over every model, those of
    ``slot_nos`` that a running attempt holds after all (none, as ``_FREE`` is written), and the sequences of
    ``model`` running (committed)."""
    rows = session.execute(
        text("SELECT 'account', account_id, SUM(n) FROM jobs "
             "WHERE state = 'running' AND account_id = ANY(CAST(:accounts AS integer[])) GROUP BY account_id "
             "UNION ALL SELECT 'slot', s.no, 0 FROM model_slots s JOIN jobs j ON j.seq = s.job_seq "
             "WHERE s.model = :model AND s.no = ANY(CAST(:nos AS integer[])) AND j.state = 'running' "
             "AND j.attempt = s.attempt "
             "UNION ALL SELECT 'model', 0, COALESCE(SUM(n), 0) FROM jobs WHERE model = :model AND state = 'running'"),
        {"accounts": sorted(accounts), "model": model, "nos": slot_nos},
    ).all()
    return ({key: int(n) for kind, key, n in rows if kind == "account"},
            {key for kind, key, _ in rows if kind == "slot"},
            sum(int(n) for kind, _, n in rows if kind == "model"))


_RUNNING = (
    select(JobRow.account_id, func.sum(JobRow.n), func.sum(case((JobRow.model == bindparam("p_model"), JobRow.n),
                                                                  else_=0)))
    .where(JobRow.state == RUNNING, or_(JobRow.model == bindparam("p_model"),
                                        JobRow.account_id.in_(bindparam("p_accounts", expanding=True))))
    .group_by(JobRow.account_id)
)


def _running(session: Session, model: str, accounts: set[int]) -> tuple[int, dict[int, int]]:
    """SQLite: sequences of ``model`` running now, and the slots each of ``accounts`` holds over every model."""
    rows = session.execute(_RUNNING, {"p_model": model, "p_accounts": sorted(accounts)}).all()
    per_account = {account: int(n or 0) for account, n, _ in rows if account in accounts}
    return sum(int(m or 0) for _, _, m in rows), per_account


#: A slot row given to a job's attempt; no slot row is ever loaded as an object, so none goes stale.
_FILL_SLOT = (update(ModelSlot).where(ModelSlot.model == bindparam("p_model"), ModelSlot.no == bindparam("p_no"))
              .values(job_seq=bindparam("p_job_seq"), attempt=bindparam("p_attempt")))


class _Slots:
    """The free slots one claim may fill: a count on SQLite, locked slot rows on PostgreSQL."""

    def __init__(self, session: Session, model: str, slots: int) -> None:
        self.session, self.model, self.slots = session, model, slots
        self.postgres = _postgres(session)
        self.free: int | None = None  # not known until the first look's accounts are held
        self.nos: list[int] = []  # PostgreSQL: the slot rows this claim holds and has not filled
        self.filled: list[dict[str, Any]] = []

    def hold(self, accounts: list[int], want: int) -> tuple[set[int], dict[int, int]]:
        """Hold what ``accounts`` (and, the first time, ``want`` slots) need; returns the accounts held and
        the slots each of them holds over every model, counted after the locks."""
        if not self.postgres:
            on_model, running = _running(self.session, self.model, set(accounts))
            if self.free is None:
                self.free = self.slots - on_model
            return set(accounts), running
        first = self.free is None
        # Waiting for accounts only in a transaction's first claim, lowest id first: two claims never wait
        # for each other's accounts crosswise.
        transaction = self.session.get_transaction()
        wait = first and self.session.info.get(_CLAIMED_KEY) is not transaction
        self.session.info[_CLAIMED_KEY] = transaction
        held, nos = _take(self.session, self.model, self.slots, accounts, want if first else 0, wait)
        if first:
            self.nos = nos
            if len(nos) < want:
                # Fewer than wanted: other claims hold the rest, or their rows are missing (the herd grew, or
                # the model is new here): they are made, and looked at once more.
                _make_slots(self.session, self.model, self.slots)
                self.nos += [no for no in _take(self.session, self.model, self.slots, [], want, False)[1]
                             if no not in self.nos][: want - len(nos)]
        running, taken, on_model = _counted(self.session, self.model, held, self.nos)
        self.nos = [no for no in self.nos if no not in taken]
        if self.free is None:
            # A job of more choices than the herd had slots holds fewer slot rows than it runs sequences:
            # the count of sequences bounds the free slots too, as it does on SQLite.
            self.free = min(len(self.nos), self.slots - on_model)
        return held, running

    def fill(self, row: JobRow, need: int) -> None:
        """Give ``need`` of the held slots to ``row``'s attempt (just started)."""
        assert self.free is not None
        self.free -= need
        if self.postgres:
            for no in self.nos[:need]:
                self.filled.append({"p_model": self.model, "p_no": no, "p_job_seq": row.seq,
                                    "p_attempt": row.attempt})
            del self.nos[:need]

    def write(self) -> None:
        """Record the attempts in their slot rows (PostgreSQL)."""
        if self.filled:
            self.session.connection().execute(_FILL_SLOT, self.filled)
            self.filled = []


def claim(session: Session, settings: HerderSettings, model: str, slots: int, now: float) -> list[JobRow]:
    """Mark the best queued jobs of ``model`` as running, up to its free slots.

    Slots are sequences: a job of ``n`` choices takes ``n`` of them (all the
    herd's, at most), as it does in a worker's engine, so no worker is sent
    more than it can decode at once. Jobs start in the fee market's order; one
    that does not fit the slots left waits for them, and so do the jobs after
    it (a best bid is never overtaken by smaller jobs).

    An account's jobs in flight hold at most its limit of slots
    (``limits.in_flight``, over every model; admission refuses a job of more
    choices than that): an account at its limit is passed over, its jobs
    wait, and the slots go to the next best jobs of other accounts.

    On PostgreSQL no lock is shared by every claim, nor by every claim of a
    model: the candidate jobs and the free slots (``ModelSlot`` rows) are
    taken ``FOR UPDATE SKIP LOCKED``, so claims wait only for rows they both
    want, and never for those; an account's slots in flight are counted under
    that account's lock, tried (a claim that finds it held passes the
    account's jobs over, until the next claim). SQLite's ``BEGIN IMMEDIATE``
    makes each claim the only writer. What the order guarantees is in
    ``docs/scaling.md``.
    """
    claimed: list[JobRow] = []
    passed: set[int] = set()  # accounts this claim starts nothing more for
    running: dict[int, int] = {}  # slots held by the accounts this claim holds
    caps: dict[int, int] = {}
    free = _Slots(session, model, slots)
    while free.free is None or free.free > 0:
        # First look: as many as seem free; then as many as this claim holds.
        asked = free.free
        rows = _startable(session, model, now, passed, slots, asked)
        if not rows:
            break
        fresh = sorted({row.account_id for row, _ in rows} - running.keys() - passed)
        if asked is None or fresh:
            held, counted = free.hold(fresh, sum(min(row.n, slots) for row, _ in rows))
            passed |= set(fresh) - held
            running.update({account: counted.get(account, 0) for account in held})
        caps.update({row.account_id: settings.account_max_in_flight if cap is None else cap for row, cap in rows})
        assert free.free is not None
        for row, _ in rows:
            if free.free <= 0:
                break
            if row.account_id in passed:  # held by another claim, or it filled up earlier in this batch
                continue
            need = min(row.n, slots)
            if need > free.free:
                free.write()
                return claimed  # the best job left waits for its slots, and everything behind it too
            cap = caps[row.account_id]
            # Admission refuses more choices than the limit; a limit lowered since may leave one alone to run.
            if running[row.account_id] and running[row.account_id] + need > cap:
                passed.add(row.account_id)  # this job would take the account past its share: it waits
                continue
            _start(row, settings, now)
            free.fill(row, need)
            claimed.append(row)
            running[row.account_id] += need
            if running[row.account_id] >= cap:
                passed.add(row.account_id)
        if free.free <= 0 or (asked is not None and len(rows) < asked):
            break  # no more candidates (a first look, made before the counts, is always made again)
        session.flush()  # the jobs just started are no longer queued for the next look
    free.write()
    return claimed


def _start(row: JobRow, settings: HerderSettings, now: float) -> None:
    """Begin a new attempt of ``row``: a fresh task id and lease."""
    row.state = RUNNING
    row.attempt += 1
    row.task_id = uuid.uuid4().hex
    row.dispatched_at = now
    row.lease_until = now + settings.lease_s
    row.worker = None
