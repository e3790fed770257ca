"""Fixtures of the herder's tests: a real ledger on SQLite and on PostgreSQL, and the herder's core on it."""

from __future__ import annotations

import json
import os
import threading
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import make_url, select, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

from llama_tasks import registry, signing
from router.core import admission, fees, ledger, provenance, queue, settlement
from router.core.db import make_engine, make_sessionmaker, upgrade
from router.core.models import ESCROW, JobRow, Transfer
from router.core.request import Submission, as_job
from router.core.settings import HerderSettings
from router.herder import stub
from router.herder.tokens import TokenCounter

#: Where the tests look for PostgreSQL when LLAMAS_TEST_POSTGRES_URL is unset.
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
#: How long the probe waits for PostgreSQL before the postgres tests skip.
PROBE_TIMEOUT_S = 3


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of a PostgreSQL that answers; skips (or, when configured, fails) otherwise."""
    configured = os.environ.get("LLAMAS_TEST_POSTGRES_URL")
    url = configured or DEFAULT_POSTGRES_URL
    probe = make_engine(
        make_url(url)
        .update_query_dict({"connect_timeout": str(PROBE_TIMEOUT_S)})
        .render_as_string(hide_password=False)
    )
    try:
        with probe.connect() as connection:
            connection.execute(text("SELECT 1"))
    except OperationalError as exc:
        reason = f"no PostgreSQL answers at {make_url(url)!r}: {exc.orig}"
        if configured:
            # Asked for explicitly: a missing server is a broken setup, not a skip.
            pytest.fail(f"LLAMAS_TEST_POSTGRES_URL is set but {reason}")
        pytest.skip(f"{reason} (set LLAMAS_TEST_POSTGRES_URL to point at one)")
    finally:
        probe.dispose()
    return url


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """URL of an empty database: a fresh SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        # A directory that does not exist yet: make_engine must create it.
        yield f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'home' / 'ledger.db'}"
        return
    base: str = request.getfixturevalue("postgres_url")
    schema = f"test_{uuid.uuid4().hex[:16]}"
    admin = make_engine(base)
    try:
        with admin.begin() as connection:
            connection.execute(text(f'CREATE SCHEMA "{schema}"'))
        # Every connection of the test sees only its own schema, so tests
        # (and alembic_version) never meet another test's tables.
        yield (
            make_url(base)
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )
    finally:
        with admin.begin() as connection:
            connection.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture
def session_factory(ledger_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on a ledger migrated to head."""
    upgrade(ledger_url)
    engine = make_engine(ledger_url)
    try:
        yield make_sessionmaker(engine)
    finally:
        engine.dispose()


# --- the herder's core: admission, queue and settlement on a real ledger ------

#: A second registry name for the bundled model, so tests can queue for two models.
TWIN_MODEL = "smollm2-twin"
#: Unix seconds the tests place jobs around: a real epoch, so aging's
#: ``bid − aging × created_at`` is exercised at realistic magnitudes.
T0 = 1_700_000_000.0


@pytest.fixture(scope="session")
def counter(tmp_path_factory: pytest.TempPathFactory) -> TokenCounter:
    """The real vocab-only SmolLM2 token counter, with a twin model registered."""
    home = tmp_path_factory.mktemp("herder-home")
    spec = registry.builtin_models()["smollm2"]
    (home / "models.json").write_text(
        json.dumps({TWIN_MODEL: {"path": spec.path, "sha256": spec.sha256}})
    )
    return TokenCounter(home / "models.json")


class Herder:
    """The herder's core on a real ledger: admission, claims and books, one transaction each."""

    def __init__(self, sessions: sessionmaker[Session], settings: HerderSettings,
                 counter: TokenCounter) -> None:
        self.sessions = sessions
        self.settings = settings
        self.counter = counter
        #: The herder's key (each attempt's secret) and the house's, as settlement checks results against them.
        self.keys = provenance.Keys(Ed25519PrivateKey.generate(), stub.HOUSE.key.public_key())

    def configure(self, **overrides: Any) -> HerderSettings:
        """Replace settings fields (max_queue, aging_per_s, fees…) for what follows."""
        self.settings = self.settings.model_copy(update=overrides)
        return self.settings

    # --- accounts ---------------------------------------------------------------

    def account(self, name: str, deposit: int = 0) -> str:
        """A requester funded with ``deposit``; returns its API key."""
        with self.sessions.begin() as session:
            _, api_key = ledger.create_account(session, name, deposit=deposit)
        return api_key

    def balance(self, name: str) -> int:
        with self.sessions() as session:
            return ledger.balance(session, ledger.account_by_name(session, name))

    def balances(self, *names: str) -> dict[str, int]:
        return {name: self.balance(name) for name in names}

    # --- requests ---------------------------------------------------------------

    def quote(self, **fields: Any) -> int:
        """The quote for a submission (defaults as ``submit``'s), counted with the counter directly."""
        sub = self._submission(fields)
        job = as_job("quote", 0, sub.generation(), 0.0, 0.0)
        return fees.quote(self.settings.base_fee, self.settings.fee_per_token,
                          self.counter.prompt_tokens(job), sub.max_tokens, sub.n)

    @staticmethod
    def _submission(fields: dict[str, Any]) -> Submission:
        defaults = {"max_tokens": 8} | ({} if "messages" in fields else {"prompt": "Say hello."})
        return Submission(**(defaults | fields))

    def submit(self, api_key: str, now: float = T0, counter: Any = None, **fields: Any) -> JobRow:
        """Admit a submission and commit, retrying once on a reference race as the service does."""
        sub = self._submission(fields)
        try:
            with self.sessions.begin() as session:
                row, _ = admission.admit(session, self.settings,
                                         admission.price(self.settings, counter or self.counter, sub),
                                         api_key, sub, now)
        except IntegrityError:
            with self.sessions.begin() as session:
                row, _ = admission.admit(session, self.settings,
                                         admission.price(self.settings, counter or self.counter, sub),
                                         api_key, sub, now)
        return row

    # --- jobs -------------------------------------------------------------------

    def job(self, job_id: str) -> JobRow:
        with self.sessions() as session:
            row = session.scalar(select(JobRow).where(JobRow.id == job_id))
            assert row is not None, job_id
            return row

    def jobs(self) -> list[JobRow]:
        with self.sessions() as session:
            return list(session.scalars(select(JobRow).order_by(JobRow.seq)))

    def claim(self, slots: int, now: float = T0, model: str = "smollm2") -> list[str]:
        """Ids of the jobs one dispatcher claims for ``model`` with ``slots`` slots."""
        with self.sessions.begin() as session:
            return [row.id for row in queue.claim(session, self.settings, model, slots, now)]

    def result(self, job_id: str, text: str, finish_reason: str = "stop", *,
               signer: signing.OperatorSigner | None = None, **extra: Any) -> dict[str, Any]:
        """The signed result document a house worker (or ``signer``'s) returns for a job's current attempt.

        One choice, ``text``, generated in as many tokens as the tokenizer counts in it
        (``completion_tokens=`` says otherwise), for the registry's model id.
        """
        row = self.job(job_id)
        tokens = extra.pop("completion_tokens", None)
        choice = {"index": 0, "text": text, "finish_reason": finish_reason,
                  "completion_tokens": self.counter.completion_tokens(row.model, text) if tokens is None else tokens}
        worker = f"{signer.name}/w@test" if signer is not None and signer.name else "w@test"
        doc = {"task_id": row.task_id, "job_id": row.id, "attempt": row.attempt, "model": row.model,
               "model_id": self.counter.model_id(row.model), "choices": [choice], "worker": worker, **extra}
        for given in doc["choices"] if isinstance(doc["choices"], list) else []:
            # Choices given whole count their own text too, unless they say how many tokens they took.
            if isinstance(given, dict) and isinstance(given.get("text"), str) and "completion_tokens" not in given:
                given["completion_tokens"] = self.counter.completion_tokens(row.model, given["text"])
        return self.sign(doc, signer)

    def sign(self, doc: dict[str, Any], signer: signing.OperatorSigner | None = None,
             secret: str | None = None) -> dict[str, Any]:
        """``doc`` attested as a worker that received its attempt signs it (the house's, or ``signer``'s)."""
        if secret is None:
            secret = signing.attempt_secret(self.keys.herder, doc["job_id"], doc["attempt"])
        return (signer or stub.HOUSE).attest_result(doc, secret)

    def settle(self, doc: dict[str, Any], now: float, claim: dict[str, Any] | None = None) -> JobRow | None:
        """Settle one result document as the herder does, in its own transaction."""
        with self.sessions.begin() as session:
            return settlement.settle(session, self.settings, self.counter, self.keys, doc, now, claim)

    def transfers(self, job_id: str) -> list[tuple[str, int]]:
        with self.sessions() as session:
            return [(t.kind, t.amount) for t in session.scalars(
                select(Transfer).where(Transfer.job_id == job_id).order_by(Transfer.id))]

    # --- the books --------------------------------------------------------------

    def assert_books(self) -> None:
        """The ledger balances, and escrow holds exactly each open job's offer, nothing for ended ones."""
        with self.sessions() as session:
            assert ledger.check(session) == []
            rows = list(session.scalars(select(JobRow)))
            escrow = ledger.balance(session, ledger.account_by_name(session, ESCROW))
            open_offers = 0
            for row in rows:
                held = ledger.held_for(session, row.id)
                if row.is_open:
                    assert held == row.offered, (row.id, row.state, held, row.offered)
                    open_offers += row.offered
                else:
                    assert held == 0, (row.id, row.state, held)
                    assert row.charged is not None and row.refunded is not None
                    assert row.charged + row.refunded == row.offered, (row.id, row.state)
                    if not settlement.chargeable(row):
                        assert row.charged == 0
            assert escrow == open_offers


@pytest.fixture
def herder(session_factory: sessionmaker[Session], counter: TokenCounter,
           ledger_url: str, tmp_path: Path) -> Herder:
    """The herder's core on a fresh ledger, with fees 5 + 2/token and no aging."""
    # Every limit the tests lean on is explicit, so no LLAMAS_* variable changes them.
    settings = HerderSettings(
        home=tmp_path, database_url=ledger_url, base_fee=5, fee_per_token=2, max_queue=1000,
        aging_per_s=0.0, n_ctx=2048, max_tokens_cap=2048, max_request_bytes=256_000,
        max_attempts=3, soft_time_limit_s=300, time_limit_s=330, visibility_timeout_s=3600,
        lease_grace_s=30.0,
    )
    return Herder(session_factory, settings, counter)


def run_together(n: int, action: Callable[[int], Any]) -> list[Any]:
    """Run ``action(i)`` for i in range(n) on n threads released at one moment.

    Returns each call's value, or the exception it raised.
    """
    start = threading.Barrier(n)

    def worker(i: int) -> Any:
        start.wait()
        try:
            return action(i)
        except Exception as exc:  # returned, so the test can count refusals by type
            return exc

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(worker, range(n)))
