"""The herder's SQL core keeps the books under any sequence of operations.

A Hypothesis state machine drives admission, dispatch, settlement, failures,
cancellations, raised bids, deadlines and leases against a real ledger
(SQLite, and PostgreSQL when one answers) with the real vocab-only tokenizer.
A plain-Python model predicts every outcome — which request is refused and
why, which jobs a dispatch takes, what a result is charged, which operator
it pays and how much — and after every step the books are audited against
it: money is conserved, escrow holds exactly the open jobs' offers, each
settled charge is split between the operator whose signature verified and
the house, every ending happens once and never changes.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)
from sqlalchemy import delete, func, make_url, select, text, update
from sqlalchemy.orm import Session

from llama_tasks import signing
from llama_tasks.errors import ContextOverflow, EmptyPrompt, InvalidMaxTokens, SamplingOutOfRange
from llama_tasks.job import MAX_CHOICES
from router.core import ledger, operators, provenance, settlement
from router.core.admission import admit, price
from router.core.db import make_engine, make_sessionmaker, upgrade
from router.core.errors import (
    AccountExists,
    BadDeadline,
    InsufficientFee,
    InsufficientFunds,
    InvalidAmount,
    InvalidOffer,
    JobNotQueued,
    QueueFull,
    ReferenceConflict,
    UnknownJob,
)
from router.core.models import (
    CANCELLED,
    DONE,
    ESCROW,
    EXPIRED,
    FAILED,
    FINAL_STATES,
    OPEN_STATES,
    QUEUED,
    REVENUE,
    RUNNING,
    WORLD,
    Account,
    Base,
    JobRow,
    Transfer,
)
from router.core.queue import claim
from router.core.request import Submission, as_job
from router.core.settings import HerderSettings
from router.herder import stub
from router.herder.tokens import TokenCounter

MODEL = "smollm2"
#: Small enough that the queue fills and long prompts overflow within a few steps.
MAX_QUEUE = 5
N_CTX = 128
BASE_FEE = 3
FEE_PER_TOKEN = 2
AGING_PER_S = 0.01
MAX_ATTEMPTS = 2
#: Lease = time limit + grace = 15 s, so a tick of up to 20 s can run one out.
TIME_LIMIT_S = 10
LEASE_GRACE_S = 5
PPM = 1_000_000

#: Gives an empty, migrated ledger: its URL, a home directory, and how to dispose of it.
Databases = Callable[[], tuple[str, Path, Callable[[], None]]]

#: Sizes of `make test`'s run; a long run raises them (LLAMAS_STATEFUL_EXAMPLES, LLAMAS_STATEFUL_STEPS).
MACHINE_SETTINGS = settings(
    max_examples=int(os.environ.get("LLAMAS_STATEFUL_EXAMPLES", "50")),
    stateful_step_count=int(os.environ.get("LLAMAS_STATEFUL_STEPS", "30")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

# --- strategies ---------------------------------------------------------------

TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=40)
MESSAGES = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]), "content": TEXT}),
    min_size=1,
    max_size=3,
)
#: Exact decimals, so the model's Fraction arithmetic is the fee module's Decimal one.
MULTIPLIERS = st.sampled_from(["0.5", "0.99", "1", "1.25", "2", "3"])
#: ("fee", n) offers n; ("over", d) offers the quote plus d, so most offers are near it.
OFFERS = st.one_of(
    st.tuples(st.just("fee"), st.integers(1, 400)),
    st.tuples(st.just("over"), st.integers(-3, 100)),
    st.tuples(st.just("multiplier"), MULTIPLIERS),
    st.tuples(st.just("default"), st.none()),
)
#: What a worker may send back: any text, often with a NUL byte (PostgreSQL
#: cannot store one) or special-token text (counted as plain text) in it.
_PIECES = st.one_of(st.text(max_size=20), st.sampled_from([" the end", "<|im_end|>"]))
COMPLETIONS = st.tuples(_PIECES, st.booleans(), _PIECES).map(lambda p: p[0] + ("\x00" if p[1] else "") + p[2])
#: Mostly none; 0 and -1 are refused.
DEADLINES = st.one_of(st.none(), st.integers(-1, 40).map(float))
DEPOSITS = st.integers(0, 3_000)
#: Completions asked for: mostly one or a few, sometimes out of range (refused).
CHOICES = st.sampled_from([1, 1, 1, 2, 2, 3, 3, 0, MAX_CHOICES + 1])
#: What a worker says it found in its prompt cache: often more than the prompt, or nonsense.
CACHED = st.one_of(st.none(), st.integers(-2, 40), st.just(True))
REFERENCES = st.one_of(st.none(), st.sampled_from(["r1", "r2", "r3"]))
#: Operator shares the herder may be set to, with rounding (0.333333) and without (0, 1).
SHARES = st.sampled_from(["0", "0.8", "1", "0.333333", "0.5"])
#: Who a result says produced it: a house worker, an operator's, or a forgery of one (never settled).
ATTRIBUTIONS = st.sampled_from(["house", "house", "genuine", "genuine", "genuine", "other key", "unregistered",
                                "replayed", "tampered", "no proof", "unsigned", "another's worker"])


def _offer_kwargs(offer: tuple[str, Any]) -> dict[str, Any]:
    kind, value = offer
    return {"fee": value} if kind == "fee" else {"multiplier": value} if kind == "multiplier" else {}


def _offered(quote: int, sub: Submission) -> int:
    if sub.fee is not None:
        return sub.fee
    return math.ceil(Fraction(str(1 if sub.multiplier is None else sub.multiplier)) * quote)


def _priority(offered: int, quote: int, created_at: float) -> float:
    # The same float operations as queue.priority, so ties break identically.
    return (offered * PPM // quote) / PPM - AGING_PER_S * created_at


# --- the model ----------------------------------------------------------------


@dataclass
class ModelAccount:
    name: str
    api_key: str
    balance: int


@dataclass
class ModelJob:
    id: str
    account: str
    seq: int
    sub: Submission
    quote: int
    prompt_tokens: int
    offered: int
    priority: float
    created_at: float
    deadline_at: float | None
    base_fee: int
    fee_per_token: int
    fee_per_cached_token: int
    state: str = QUEUED
    attempt: int = 0
    task_id: str | None = None
    lease_until: float | None = None
    holds: int = 1
    charged: int | None = None
    refunded: int | None = None
    #: The operator credited at settlement and what it earned; None and 0: the house took it all.
    operator: str | None = None
    earned: int = 0


@dataclass
class ModelOperator:
    """A registered operator: its workers' signer and what it earned and was paid out."""

    name: str
    signer: signing.OperatorSigner
    earned: int = 0
    paid_out: int = 0
    jobs: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class Attempt:
    """A dispatched attempt whose result may arrive (again, or too late) at any time."""

    job_id: str
    task_id: str
    attempt: int


def _footprint(session: Session) -> tuple[Any, ...]:
    """Everything a refused or ignored operation must leave exactly as it was."""
    session.flush()
    return (
        tuple(session.execute(select(Account.id, Account.balance).order_by(Account.id))),
        session.scalar(select(func.count()).select_from(Transfer)),
        tuple(
            session.execute(
                select(JobRow.id, JobRow.state, JobRow.offered, JobRow.attempt, JobRow.task_id,
                       JobRow.charged, JobRow.refunded, JobRow.operator).order_by(JobRow.seq)
            )
        ),
    )


class HerderCore(RuleBasedStateMachine):
    """Admission, dispatch and settlement against a model of what each must do."""

    def __init__(self, database: Databases, counter: TokenCounter) -> None:
        super().__init__()
        url, home, self._dispose = database()
        self.engine = make_engine(url)
        self.sessions = make_sessionmaker(self.engine)
        self.settings = HerderSettings(
            home=home, database_url=url, max_queue=MAX_QUEUE, max_attempts=MAX_ATTEMPTS,
            n_ctx=N_CTX, base_fee=BASE_FEE, fee_per_token=FEE_PER_TOKEN, aging_per_s=AGING_PER_S,
            time_limit_s=TIME_LIMIT_S, soft_time_limit_s=TIME_LIMIT_S // 2, lease_grace_s=LEASE_GRACE_S,
            # Fair shares are tested on their own (tests/security/test_fair_shares.py): here no account's binds.
            account_max_in_flight=10**6,
        )
        self.counter = counter
        #: The herder's key (each attempt's secret) and the house workers' public key.
        self.keys = provenance.Keys(Ed25519PrivateKey.generate(), stub.HOUSE.key.public_key())
        self.now = 1_000.0
        self.accounts: dict[str, ModelAccount] = {}
        self.jobs: dict[str, ModelJob] = {}
        self.references: dict[tuple[str, str], str] = {}
        self.attempts: list[Attempt] = []
        self.operators: dict[str, ModelOperator] = {}
        #: (state, charged, refunded) of each job when it ended: never to change.
        self.endings: dict[str, tuple[str, int | None, int | None]] = {}

    def teardown(self) -> None:
        self.engine.dispose()
        self._dispose()

    # --- helpers --------------------------------------------------------------

    def _in_state(self, *states: str) -> list[ModelJob]:
        return [j for j in self.jobs.values() if j.state in states]

    def _end(self, job: ModelJob, state: str, charged: int, refunded: int) -> None:
        event(f"ended: {state}")
        assert job.id not in self.endings, f"job {job.id} ended twice"
        assert charged + refunded == job.offered
        job.state, job.charged, job.refunded, job.lease_until = state, charged, refunded, None
        self.accounts[job.account].balance += refunded
        self.endings[job.id] = (state, charged, refunded)

    def _refund(self, job: ModelJob, state: str) -> None:
        self._end(job, state, 0, job.offered)

    def _ignored(self, session: Session, call: Callable[[], Any]) -> None:
        """``call`` must return None and change nothing."""
        before = _footprint(session)
        assert call() is None
        assert _footprint(session) == before
        event("ignored")

    def _refused(self, session: Session, error: type[Exception], call: Callable[[], Any]) -> Exception:
        """``call`` must raise ``error`` and hold, move or write nothing."""
        before = _footprint(session)
        with pytest.raises(error) as info:
            call()
        assert _footprint(session) == before, f"{error.__name__} left changes behind"
        event(f"refused: {error.__name__}")
        return info.value

    # --- accounts -------------------------------------------------------------

    def _open(self, deposit: int) -> None:
        name = f"acct{len(self.accounts)}"
        with self.sessions.begin() as session:
            _, api_key = ledger.create_account(session, name, deposit=deposit)
        self.accounts[name] = ModelAccount(name, api_key, deposit)

    @initialize(deposits=st.lists(st.integers(200, 3_000), min_size=1, max_size=3))
    def open_accounts(self, deposits: list[int]) -> None:
        for deposit in deposits:
            self._open(deposit)

    @initialize(deposits=st.lists(st.integers(0, 3_000), min_size=1, max_size=2))
    def register_operators(self, deposits: list[int]) -> None:
        """Operators whose accounts open with them: they earn, and buy inference like anyone."""
        for i, deposit in enumerate(deposits):
            name = f"op{i}"
            signer = signing.OperatorSigner(name, Ed25519PrivateKey.generate())
            with self.sessions.begin() as session:
                _, api_key = operators.register(session, name, signer.key.public_key())
                assert api_key is not None
                if deposit:
                    ledger.deposit(session, ledger.account_by_name(session, name), deposit)
            self.accounts[name] = ModelAccount(name, api_key, deposit)
            self.operators[name] = ModelOperator(name, signer)

    @precondition(lambda self: self.operators)
    @rule(data=st.data(), amount=st.integers(0, 300))
    def payout(self, data: st.DataObject, amount: int) -> None:
        """An operator is paid out (refused for nothing, or more than its balance)."""
        name = data.draw(st.sampled_from(sorted(self.operators)))
        account = self.accounts[name]
        with self.sessions.begin() as session:
            call = lambda: operators.payout(session, name, amount)
            if amount == 0 or amount > account.balance:
                self._refused(session, InvalidAmount if amount == 0 else InsufficientFunds, call)
                return
            call()
        account.balance -= amount
        self.operators[name].paid_out += amount

    @rule(data=st.data(), deposit=DEPOSITS, taken=st.integers(0, 9))
    def open_account(self, data: st.DataObject, deposit: int, taken: int) -> None:
        if taken:
            self._open(deposit)
            return
        name = data.draw(st.sampled_from(sorted(self.accounts)))
        with self.sessions.begin() as session:
            self._refused(session, AccountExists, lambda: ledger.create_account(session, name, deposit=deposit))

    @precondition(lambda self: self.accounts)
    @rule(data=st.data(), amount=st.integers(1, 1_000))
    def deposit(self, data: st.DataObject, amount: int) -> None:
        name = data.draw(st.sampled_from(sorted(self.accounts)))
        with self.sessions.begin() as session:
            ledger.deposit(session, ledger.account_by_name(session, name), amount)
        self.accounts[name].balance += amount

    # --- admission ------------------------------------------------------------

    def _quote(self, sub: Submission) -> int | None:
        """The fee a valid request is quoted; None if it does not fit the context."""
        content = sub.prompt if sub.messages is None else "".join(m["content"] for m in sub.messages)
        if not (content or "").strip() or sub.max_tokens < 1:
            return None
        prompt_tokens = self.counter.prompt_tokens(as_job("model", 0, sub.generation(), 0.0, 0.0))
        if prompt_tokens + sub.max_tokens > N_CTX:
            return None
        return self.settings.base_fee + self.settings.fee_per_token * (prompt_tokens + sub.n * sub.max_tokens)

    def _expect_admission(self, account: ModelAccount, sub: Submission) -> tuple[type[Exception] | None, int, int]:
        """The refusal ``admit`` must raise (None: admitted), the quote and the offer.

        In the service's order: the request itself is checked and priced
        before the ledger is read, then a reused reference is looked up,
        then the money.
        """
        content = sub.prompt if sub.messages is None else "".join(m["content"] for m in sub.messages)
        if not (content or "").strip():
            return EmptyPrompt, 0, 0
        if not 1 <= sub.max_tokens <= self.settings.max_tokens_cap:
            return InvalidMaxTokens, 0, 0
        if not 1 <= sub.n <= MAX_CHOICES:
            return SamplingOutOfRange, 0, 0
        if sub.deadline_s is not None and sub.deadline_s <= 0:
            return BadDeadline, 0, 0
        quote = self._quote(sub)
        if quote is None:
            return ContextOverflow, 0, 0
        if sub.reference is not None and (account.name, sub.reference) in self.references:
            existing = self.jobs[self.references[account.name, sub.reference]]
            if replace(existing.sub, reference=None) != replace(sub, reference=None):
                return ReferenceConflict, 0, 0
            return None, existing.quote, existing.offered
        offered = _offered(quote, sub)
        if offered < quote:
            return InsufficientFee, quote, offered
        if len(self._in_state(QUEUED)) >= MAX_QUEUE:
            return QueueFull, quote, offered
        if offered > account.balance:
            return InsufficientFunds, quote, offered
        return None, quote, offered

    def _submit(self, name: str, sub: Submission) -> None:
        account = self.accounts[name]
        refusal, quote, offered = self._expect_admission(account, sub)
        with self.sessions.begin() as session:
            call = lambda: admit(session, self.settings, price(self.settings, self.counter, sub), account.api_key, sub,
                                 self.now)
            if refusal is not None:
                exc = self._refused(session, refusal, call)
                if isinstance(exc, InsufficientFee):
                    assert (exc.needed, exc.offered) == (quote, offered)
                if isinstance(exc, InsufficientFunds):
                    assert (exc.balance, exc.needed) == (account.balance, offered)
                return
            known = self.references.get((name, sub.reference)) if sub.reference is not None else None
            before = _footprint(session) if known else None
            row, created = call()
            if known:
                # A retried submit: the same job, and not a second hold.
                assert (row.id, created) == (known, False)
                assert _footprint(session) == before
                return
            assert created and row.state == QUEUED
            assert (row.quote, row.offered, row.attempt) == (quote, offered, 0)
            job = ModelJob(
                id=row.id, account=name, seq=len(self.jobs), sub=sub, quote=quote,
                prompt_tokens=row.prompt_tokens, offered=offered,
                priority=_priority(offered, quote, self.now), created_at=self.now,
                deadline_at=None if sub.deadline_s is None else self.now + sub.deadline_s,
                base_fee=self.settings.base_fee, fee_per_token=self.settings.fee_per_token,
                fee_per_cached_token=self.settings.cached_token_fee,
            )
            assert row.priority == job.priority
        event("admitted")
        self.jobs[job.id] = job
        account.balance -= offered
        if sub.reference is not None:
            self.references[name, sub.reference] = job.id

    @precondition(lambda self: self.accounts)
    @rule(data=st.data(), chat=st.booleans(), max_tokens=st.integers(0, 64), n=CHOICES,
          offer=OFFERS, reference=REFERENCES, deadline_s=DEADLINES)
    def submit(self, data: st.DataObject, chat: bool, max_tokens: int, n: int, offer: tuple[str, Any],
               reference: str | None, deadline_s: float | None) -> None:
        name = data.draw(st.sampled_from(sorted(self.accounts)))
        prompt, messages = (None, data.draw(MESSAGES)) if chat else (data.draw(TEXT), None)
        sub = Submission(prompt=prompt, messages=messages, max_tokens=max_tokens, model=MODEL,
                         reference=reference, deadline_s=deadline_s, n=n)
        if offer[0] == "over":
            quote = self._quote(sub)
            offer = ("fee", max(1, (quote or 0) + offer[1]))
        self._submit(name, replace(sub, **_offer_kwargs(offer)))

    @precondition(lambda self: self.references)
    @rule(data=st.data(), changed=st.booleans())
    def resubmit(self, data: st.DataObject, changed: bool) -> None:
        """Retry a submit with a used reference: the same job, or a conflict if it differs."""
        name, reference = data.draw(st.sampled_from(sorted(self.references)))
        sub = self.jobs[self.references[name, reference]].sub
        if changed:
            sub = replace(sub, max_tokens=sub.max_tokens % 64 + 1)
        self._submit(name, sub)

    @rule(base_fee=st.integers(0, 5), fee_per_token=st.integers(1, 3), cached=st.one_of(st.none(), st.integers(0, 3)),
          share=SHARES)
    def reprice(self, base_fee: int, fee_per_token: int, cached: int | None, share: str) -> None:
        """The house changes the prices and the operators' share; jobs already quoted keep their prices."""
        self.settings = self.settings.model_copy(update={
            "base_fee": base_fee, "fee_per_token": fee_per_token,
            "fee_per_cached_token": None if cached is None else min(cached, fee_per_token),
            "operator_share": Decimal(share)})

    # --- dispatch -------------------------------------------------------------

    @precondition(lambda self: any(j.state == QUEUED for j in self.jobs.values()))
    @rule(slots=st.integers(1, 4))
    def dispatch(self, slots: int) -> None:
        # Slots are sequences: a job of n choices takes n (all of them, at most).
        free = slots - sum(j.sub.n for j in self._in_state(RUNNING))
        # Past its deadline a queued job is the tick's to expire, not dispatch's to run.
        startable = [j for j in self._in_state(QUEUED) if j.deadline_at is None or j.deadline_at >= self.now]
        expected = []
        for j in sorted(startable, key=lambda j: (-j.priority, j.seq)):
            if min(j.sub.n, slots) > free:
                break  # the best job left waits for its slots, and everything behind it
            expected.append(j.id)
            free -= min(j.sub.n, slots)
        with self.sessions.begin() as session:
            rows = claim(session, self.settings, MODEL, slots, self.now)
            claimed = [(row.id, row.task_id, row.attempt, row.lease_until) for row in rows]
        assert [job_id for job_id, *_ in claimed] == expected, "claim broke the fee market's order"
        event(f"claimed {len(claimed)}")
        for job_id, task_id, attempt, lease_until in claimed:
            job = self.jobs[job_id]
            assert task_id and attempt == job.attempt + 1
            assert lease_until == self.now + self.settings.lease_s
            job.state, job.task_id, job.attempt, job.lease_until = RUNNING, task_id, attempt, lease_until
            self.attempts.append(Attempt(job_id, task_id, attempt))

    # --- results --------------------------------------------------------------

    def _attribute(self, data: st.DataObject, doc: dict[str, Any], how: str) -> tuple[dict[str, Any], str | None, bool]:
        """``doc`` as a worker sends it (signed, or forged, as ``how`` says), the operator it pays, and whether
        it may be settled at all (only a genuine signature with the attempt's proof of receipt is)."""
        secret = signing.attempt_secret(self.keys.herder, doc["job_id"], doc["attempt"])
        if how == "house":
            return stub.HOUSE.attest_result(doc, secret), None, True
        if how == "unsigned":
            return doc, None, False
        name = data.draw(st.sampled_from(sorted(self.operators)))
        signer = self.operators[name].signer
        doc = doc | {"worker": f"{name}/w1"}
        if how == "genuine":
            return signer.attest_result(doc, secret), name, True
        if how == "another's worker":
            return signer.attest_result(doc | {"worker": "w1"}, secret), None, False
        if how == "no proof":
            # Signed by the operator, but by a worker that never received the attempt's envelope.
            return signer.attest_result(doc, secrets.token_hex(32)), None, False
        if how == "other key":
            # Signed by another operator's key (or a stranger's) while claiming this one.
            keys = [o.signer.key for o in self.operators.values() if o.name != name] + [Ed25519PrivateKey.generate()]
            return signing.OperatorSigner(name, data.draw(st.sampled_from(keys))).attest_result(doc, secret), None, False
        if how == "unregistered":
            return signing.OperatorSigner("ghost", Ed25519PrivateKey.generate()).attest_result(
                doc | {"worker": "ghost/w1"}, secret), None, False
        if how == "replayed":
            # A genuine attestation of another job's result, copied onto this one.
            other = signer.attest_result(doc | {"job_id": uuid.uuid4().hex}, secret)
            return doc | {"operator": name, signing.ATTESTATION: other[signing.ATTESTATION]}, None, False
        assert how == "tampered"
        return signer.attest_result(doc, secret) | {"timings": {"total_s": 9.5}}, None, False

    def _deliver(self, attempt: Attempt, job_id: str, attempt_no: int, texts: list[str], cached: Any,
                 no_choices: bool, data: st.DataObject, how: str) -> None:
        """A result of ``texts`` and ``cached`` prompt tokens; or, ``no_choices``, one without choices."""
        doc: dict[str, Any] = {"task_id": attempt.task_id, "job_id": job_id, "attempt": attempt_no, "model": MODEL,
                               "model_id": self.counter.model_id(MODEL), "worker": "w1", "timings": {"total_s": 0.5}}
        if no_choices:
            # Text anywhere but in choices is not read: one empty completion, nothing cached.
            doc |= {"text": texts[0], "finish_reason": "length"}
            texts = [""]
        else:
            doc["cached_tokens"] = cached
            # An honest worker's count of what it generated: the tokens of its text.
            doc["choices"] = [{"index": i, "text": t, "finish_reason": "stop",
                               "completion_tokens": self.counter.completion_tokens(MODEL, t), "logprobs": None}
                              for i, t in enumerate(texts)]
        doc, operator, proven = self._attribute(data, doc, how)
        job = self.jobs[attempt.job_id]
        current = job.state == RUNNING and job.task_id == attempt.task_id
        with self.sessions.begin() as session:
            call = lambda: settlement.settle(session, self.settings, self.counter, self.keys, doc, self.now)
            if not (current and job_id == job.id and attempt_no == job.attempt and proven):
                # Not the current attempt, or not proven to come from a worker that received it: nothing moves,
                # and the attempt stays running until its lease runs out.
                self._ignored(session, call)
                event(f"refused: {how}" if current else "stale")
                return
            row = call()
            assert row is not None and row.state == DONE
            # Every completion asked for is paid for, and no more than were asked for.
            # Each at the count its worker signed, never past max_tokens.
            completion = sum(min(self.counter.completion_tokens(MODEL, t), job.sub.max_tokens)
                             for t in texts[: job.sub.n])
            valid = isinstance(cached, int) and not isinstance(cached, bool) and not no_choices
            cached = min(max(cached, 0), job.prompt_tokens) if valid else 0
            # At the prices the job was quoted, whatever they are now.
            actual = (job.base_fee + job.fee_per_token * (job.prompt_tokens - cached + completion)
                      + job.fee_per_cached_token * cached)
            charge = min(job.offered, job.offered * actual // job.quote)
            # The operator's share of the charge is rounded down; the house keeps the rest.
            earned = 0 if operator is None else charge * int(Decimal(self.settings.operator_share) * PPM) // PPM
            assert (row.charged, row.refunded, row.completion_tokens, row.cached_tokens, row.operator) == (
                charge, job.offered - charge, completion, cached, operator)
            event(f"settled {min(len(texts), job.sub.n)} of {job.sub.n} choices")
            event(f"attribution: {how}")
        self._end(job, DONE, charge, job.offered - charge)
        if operator is not None:
            job.operator, job.earned = operator, earned
            self.accounts[operator].balance += earned
            self.operators[operator].earned += earned
            self.operators[operator].jobs.add(job.id)

    @precondition(lambda self: any(j.state == RUNNING for j in self.jobs.values()))
    @rule(data=st.data(), texts=st.lists(COMPLETIONS, min_size=1, max_size=4), cached=CACHED,
          no_choices=st.booleans(), how=ATTRIBUTIONS)
    def complete(self, data: st.DataObject, texts: list[str], cached: Any, no_choices: bool, how: str) -> None:
        """The current attempt of a running job reports its result."""
        job = data.draw(st.sampled_from(self._in_state(RUNNING)))
        assert job.task_id is not None
        self._deliver(Attempt(job.id, job.task_id, job.attempt), job.id, job.attempt, texts, cached, no_choices,
                      data, how)

    @precondition(lambda self: any(j.state == QUEUED for j in self.jobs.values()))
    @rule(data=st.data(), slots=st.integers(1, 4), texts=st.lists(COMPLETIONS, min_size=1, max_size=4),
          cached=CACHED, no_choices=st.booleans(), how=ATTRIBUTIONS)
    def serve(self, data: st.DataObject, slots: int, texts: list[str], cached: Any, no_choices: bool, how: str) -> None:
        """A slot frees up and a running job answers at once: most jobs' whole life, in one step.

        Without it a job is far likelier to be cancelled than settled, and
        settlement's split between operators and the house would be seldom checked.
        """
        self.dispatch(slots)
        if self._in_state(RUNNING):
            self.complete(data, texts, cached, no_choices, how)

    @precondition(lambda self: self.attempts)
    @rule(data=st.data(), texts=st.lists(COMPLETIONS, min_size=1, max_size=4), cached=CACHED,
          no_choices=st.booleans(), forge=st.sampled_from(["none", "attempt", "job"]), how=ATTRIBUTIONS)
    def redeliver(self, data: st.DataObject, texts: list[str], cached: Any, no_choices: bool, forge: str,
                  how: str) -> None:
        """Any attempt's result arrives (again, late, or with a forged attempt or job), signed or not."""
        attempt = data.draw(st.sampled_from(self.attempts))
        job_id = uuid.uuid4().hex if forge == "job" else attempt.job_id
        attempt_no = attempt.attempt + (1 if forge == "attempt" else 0)
        self._deliver(attempt, job_id, attempt_no, texts, cached, no_choices, data, how)

    @precondition(lambda self: self.attempts)
    @rule(data=st.data(), retryable=st.booleans())
    def fail(self, data: st.DataObject, retryable: bool) -> None:
        """An attempt (the current one, or a stale one) fails."""
        if self._in_state(RUNNING) and data.draw(st.booleans()):
            job = data.draw(st.sampled_from(self._in_state(RUNNING)))
            assert job.task_id is not None
            task_id = job.task_id
        else:
            task_id = data.draw(st.sampled_from(self.attempts)).task_id
        running = [j for j in self._in_state(RUNNING) if j.task_id == task_id]
        with self.sessions.begin() as session:
            call = lambda: settlement.fail_attempt(
                session, self.settings, task_id, "WorkerLost", "boom", retryable, self.now
            )
            if not running:
                self._ignored(session, call)
                return
            job = running[0]
            row = call()
            if retryable and job.attempt < MAX_ATTEMPTS:
                assert row is None
                job.state, job.task_id, job.lease_until = QUEUED, None, None
                return
            assert row is not None and row.state == FAILED
        self._refund(job, FAILED)

    # --- the requester's own changes -------------------------------------------

    def _pick(self, data: st.DataObject) -> tuple[ModelAccount, str]:
        """Mostly a queued job and its owner; sometimes any job, another account or an unknown id."""
        queued = [j.id for j in self._in_state(QUEUED)]
        if queued and data.draw(st.integers(0, 3)):
            job_id = data.draw(st.sampled_from(queued))
        else:
            job_id = data.draw(st.sampled_from([*self.jobs, "no-such-job"]))
        owner = self.jobs[job_id].account if job_id in self.jobs else None
        if owner is None or data.draw(st.integers(0, 4)) == 0:
            owner = data.draw(st.sampled_from(sorted(self.accounts)))
        return self.accounts[owner], job_id

    def _ownership_refusal(self, account: ModelAccount, job_id: str) -> type[Exception] | None:
        job = self.jobs.get(job_id)
        if job is None or job.account != account.name:
            return UnknownJob
        return None if job.state == QUEUED else JobNotQueued

    @precondition(lambda self: self.jobs)
    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        account, job_id = self._pick(data)
        refusal = self._ownership_refusal(account, job_id)
        with self.sessions.begin() as session:
            owner = ledger.account_by_key(session, account.api_key)
            if refusal is not None:
                self._refused(session, refusal, lambda: settlement.cancel(session, owner, job_id, self.now))
                return
            row = settlement.cancel(session, owner, job_id, self.now)
            assert row.state == CANCELLED
        self._refund(self.jobs[job_id], CANCELLED)

    @precondition(lambda self: self.jobs)
    @rule(data=st.data(), offer=st.one_of(st.tuples(st.just("fee"), st.integers(1, 600)),
                                          st.tuples(st.just("multiplier"), MULTIPLIERS)))
    def raise_bid(self, data: st.DataObject, offer: tuple[str, Any]) -> None:
        account, job_id = self._pick(data)
        kwargs: dict[str, Any] = {"fee": None, "multiplier": None} | _offer_kwargs(offer)
        refusal = self._ownership_refusal(account, job_id)
        new_offer = 0
        if refusal is None:
            job = self.jobs[job_id]
            new_offer = _offered(job.quote, Submission(fee=kwargs["fee"], multiplier=kwargs["multiplier"]))
            if new_offer <= job.offered:
                refusal = InvalidOffer
            elif new_offer - job.offered > account.balance:
                refusal = InsufficientFunds
        with self.sessions.begin() as session:
            owner = ledger.account_by_key(session, account.api_key)
            call = lambda: settlement.raise_bid(session, self.settings, owner, job_id, **kwargs)
            if refusal is not None:
                self._refused(session, refusal, call)
                return
            row = call()
            assert (row.state, row.offered) == (QUEUED, new_offer)
            priority = _priority(new_offer, job.quote, job.created_at)
            assert row.priority == priority
        account.balance -= new_offer - job.offered
        job.offered, job.priority, job.holds = new_offer, priority, job.holds + 1

    # --- time -----------------------------------------------------------------

    @rule(dt_s=st.integers(1, 20))
    def advance(self, dt_s: int) -> None:
        """Time passes: deadlines and leases may run out before the next tick."""
        self.now += dt_s

    @rule()
    def tick(self) -> None:
        """The herder's periodic duties: expire deadlines, then reap leases."""
        expired = [j for j in self._in_state(QUEUED) if j.deadline_at is not None and j.deadline_at < self.now]
        reaped = [j for j in self._in_state(RUNNING) if j.lease_until is not None and j.lease_until < self.now]
        with self.sessions.begin() as session:
            ended_by_deadline = settlement.expire_deadlines(session, self.now)
            ended_by_lease = settlement.reap_leases(session, self.settings, self.now)
            assert {row.id for row in ended_by_deadline} == {j.id for j in expired}
            assert all(row.state == EXPIRED for row in ended_by_deadline)
            assert {row.id for row in ended_by_lease} == {j.id for j in reaped if j.attempt >= MAX_ATTEMPTS}
            assert all(row.state == FAILED for row in ended_by_lease)
        for job in expired:
            self._refund(job, EXPIRED)
        for job in reaped:
            if job.attempt < MAX_ATTEMPTS:
                job.state, job.task_id, job.lease_until = QUEUED, None, None
            else:
                self._refund(job, FAILED)

    # --- the books --------------------------------------------------------------

    @invariant()
    def books_balance(self) -> None:
        with self.sessions() as session:
            assert ledger.check(session) == []
            balances = {name: int(b) for name, b in session.execute(select(Account.name, Account.balance))}
            assert sum(balances.values()) == 0, "money was created or destroyed"
            assert all(b >= 0 for name, b in balances.items() if name != WORLD), balances
            assert {n: a.balance for n, a in self.accounts.items()} == {n: balances[n] for n in self.accounts}
            assert balances[ESCROW] == sum(j.offered for j in self._in_state(*OPEN_STATES))
            # The house keeps what its operators did not earn.
            assert balances[REVENUE] == sum((j.charged or 0) - j.earned for j in self._in_state(DONE))
            for op in self.operators.values():
                found = operators.earnings(session, op.name)
                assert (found["earned"], found["paid_out"], found["balance"], found["jobs"]) == (
                    op.earned, op.paid_out, self.accounts[op.name].balance, len(op.jobs)), op.name

    @invariant()
    def jobs_end_once(self) -> None:
        with self.sessions() as session:
            rows = {row.id: row for row in session.scalars(select(JobRow))}
            assert rows.keys() == self.jobs.keys()
            kinds = Counter(
                (job_id, kind) for job_id, kind in session.execute(select(Transfer.job_id, Transfer.kind))
            )
            totals = session.execute(
                select(Transfer.job_id, Transfer.kind, func.sum(Transfer.amount))
                .group_by(Transfer.job_id, Transfer.kind)
            )
            amounts = {(job_id, kind): int(total) for job_id, kind, total in totals}
            for job in self.jobs.values():
                row = rows[job.id]
                assert (row.state, row.attempt, row.offered) == (job.state, job.attempt, job.offered), job.id
                held = ledger.held_for(session, job.id)
                assert (held > 0) == (row.state in OPEN_STATES)
                assert kinds[job.id, "capture"] <= 1, f"job {job.id} charged twice"
                assert kinds[job.id, "earn"] <= 1, f"job {job.id} paid its operator twice"
                assert kinds[job.id, "hold"] == job.holds
                assert row.operator == job.operator
                if row.state in OPEN_STATES:
                    assert held == row.offered
                    assert kinds[job.id, "capture"] == kinds[job.id, "release"] == kinds[job.id, "earn"] == 0
                    continue
                assert row.state in FINAL_STATES
                assert held == 0
                assert row.charged is not None and row.refunded is not None
                assert row.charged + row.refunded == row.offered
                assert 0 <= row.charged <= row.offered
                # Every unit charged went to the operator or the house, and nothing else did.
                assert amounts.get((job.id, "earn"), 0) == job.earned
                assert amounts.get((job.id, "earn"), 0) + amounts.get((job.id, "capture"), 0) == row.charged
                if not settlement.chargeable(row):
                    assert row.charged == 0 and kinds[job.id, "capture"] == kinds[job.id, "earn"] == 0
                assert kinds[job.id, "release"] <= 1
                assert (row.state, row.charged, row.refunded) == self.endings[job.id], "a final job changed"


# --- running it -------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_counter(tmp_path_factory: pytest.TempPathFactory) -> TokenCounter:
    """The real vocab-only SmolLM2 tokenizer, loaded once for the module."""
    counter = TokenCounter(tmp_path_factory.mktemp("models") / "models.json")
    counter.completion_tokens(MODEL, "warm up")
    return counter


@pytest.fixture(params=["sqlite", "postgresql"])
def databases(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Databases]:
    """Migrated, empty ledgers, one per example.

    A migration per example would dominate the run (and shrinking replays
    hundreds of examples), so SQLite examples get a copy of one migrated
    file, and PostgreSQL examples share one migrated schema (as conftest
    makes them), emptied after each.
    """
    home = tmp_path_factory.mktemp("herder")
    if request.param == "sqlite":
        template = home / "template.db"
        upgrade(f"sqlite:///{template}")

        def fresh_copy() -> tuple[str, Path, Callable[[], None]]:
            path = home / f"{uuid.uuid4().hex}.db"
            shutil.copyfile(template, path)
            return f"sqlite:///{path}", home, lambda: path.unlink(missing_ok=True)

        yield fresh_copy
        return
    base: str = request.getfixturevalue("postgres_url")
    schema = f"stateful_{uuid.uuid4().hex[:16]}"
    url = make_url(base).update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
    admin = make_engine(base)
    with admin.begin() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    upgrade(url)
    engine = make_engine(url)

    def empty() -> None:
        # Every table the models know, so a new one is emptied too; the
        # system accounts the migration made stay, back at zero.
        with engine.begin() as connection:
            for table in reversed(Base.metadata.sorted_tables):
                if table is Account.__table__:
                    connection.execute(delete(table).where(table.c.kind == "user"))
                    connection.execute(update(table).values(balance=0))
                else:
                    connection.execute(delete(table))

    try:
        yield lambda: (url, home, empty)
    finally:
        engine.dispose()
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


def test_herder_core_keeps_the_books(databases: Databases, token_counter: TokenCounter) -> None:
    run_state_machine_as_test(lambda: HerderCore(databases, token_counter), settings=MACHINE_SETTINGS)
