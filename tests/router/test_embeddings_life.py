"""An embedding request's whole life in one process: quoted, held, queued, embedded by the worker's own
code on the bundled model, charged exactly and answered (``router.herder.stub``; drain, then assert)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from llama_tasks import embedding_job, runtime, signing
from llama_tasks.errors import BadInput, EmptyInput, InputTooLong, InvalidRequest
from llama_tasks.placement import place
from llama_tasks.settings import WorkerSettings
from router.core import fees, ledger, retention, views
from router.core.errors import InsufficientFee, UnsupportedParameter
from router.core.models import JobRow
from router.core.request import Submission
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.herder import stub

DEPOSIT = 100_000
N_CTX = 512
TEXTS = ["A llama grazes on the hill.", "Alpacas are smaller than llamas.", "The stock market fell today."]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[runtime.ProcessContext]:
    """The worker's process context on the bundled model, trusting every herder the tests build."""
    home = tmp_path_factory.mktemp("embed-worker")
    signing.write_private(home / "house.key", stub.HOUSE.key)
    signing.generate_keypair(home)
    settings = WorkerSettings(home=home, redis_url=redis_url, slots=2, n_ctx=N_CTX,
                              public_key=(home / "herder.pub").read_text().strip())
    ctx = runtime.start_process(settings, place(None, 1), slots=2)
    yield ctx
    ctx.engine.stop()


@pytest.fixture
def life(tmp_path: Path, redis_url: str, ledger_url: str,
         worker: runtime.ProcessContext) -> Iterator[tuple[HerderService, stub.StubTransport, str]]:
    """A herder on a fresh ledger (SQLite, and PostgreSQL where one answers) whose jobs the worker runs inline."""
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, database_url=ledger_url, n_ctx=N_CTX, base_fee=3,
                              fee_per_token=1, fee_per_embedding_token=2)
    transport = stub.StubTransport()
    key = signing.load_private(worker.settings.home / "herder.key")
    svc = stub.build(settings, transport=transport, slots=2, key=key)
    with svc.sessions.begin() as s:
        _, api_key = ledger.create_account(s, "embedder", DEPOSIT)
    yield svc, transport, api_key


def run_worker(ctx: runtime.ProcessContext) -> stub.StubWorker:
    return lambda envelope, task_id: runtime.run_envelope(ctx, envelope, task_id, "inline@test")


def books(svc: HerderService, key: str) -> tuple[int, list[str]]:
    with svc.sessions.begin() as s:
        return ledger.balance(s, ledger.account_by_key(s, key)), ledger.check(s)


def test_an_embedding_is_quoted_held_embedded_and_charged_exactly(life: Any, worker: Any) -> None:
    svc, transport, key = life
    sub = Submission(input=list(TEXTS), multiplier=1.5)
    quote = svc.quote(sub)
    tokens = svc.counter.input_tokens(sub)  # type: ignore[attr-defined]
    assert quote["prompt_tokens"] == sum(tokens) and quote["inputs"] == 3
    assert quote["quote"] == 3 + 2 * sum(tokens) and quote["fee_per_embedding_token"] == 2
    doc = svc.submit(key, sub)
    assert doc["offered"] == math.ceil(1.5 * quote["quote"])
    transport.join(svc, run_worker(worker))
    response = transport.responses[doc["job_id"]]
    assert response["status"] == "done" and response["prompt_tokens"] == sum(tokens)
    # The timings every reader of a result expects (the worker's task logs prompt_s and generation_s).
    assert {"prompt_s", "generation_s", "queue_wait_s"} <= set(response["timings"])
    assert response["completion_tokens"] == 0
    vectors = [np.array(embedding_job.decode_vector(c["embedding"])) for c in response["choices"]]
    assert [c["index"] for c in response["choices"]] == [0, 1, 2]
    assert all(v.shape == (576,) and abs(float(np.linalg.norm(v)) - 1) < 1e-5 for v in vectors)
    # The two sentences about llamas are nearer each other than either is to the market.
    assert float(vectors[0] @ vectors[1]) > max(float(vectors[0] @ vectors[2]), float(vectors[1] @ vectors[2]))
    # Nothing is unknown at the quote: the charge is the multiplier times the quote, the hold exactly.
    assert response["charged"] == fees.charge(doc["offered"], quote["quote"], quote["quote"]) == doc["offered"]
    assert response["refunded"] == 0
    balance, problems = books(svc, key)
    assert balance == DEPOSIT - response["charged"] and problems == []
    receipt = signing.verify(svc.receipt(key, doc["job_id"]), svc.public_key)
    assert receipt["fee_per_token"] == 2 and receipt["charged"] == response["charged"]
    assert receipt["max_tokens"] == 0 and receipt["prompt_tokens"] == sum(tokens)


def test_inputs_of_several_requests_are_embedded_and_each_charged_for_its_own(life: Any, worker: Any) -> None:
    svc, transport, key = life
    docs = [svc.submit(key, Submission(input=[text])) for text in TEXTS]
    transport.join(svc, run_worker(worker))
    charged = [transport.responses[d["job_id"]]["charged"] for d in docs]
    assert charged == [d["quote"] for d in docs]
    assert books(svc, key) == (DEPOSIT - sum(charged), [])


@pytest.mark.parametrize(("sub", "error"), [
    (Submission(input=[]), EmptyInput),
    (Submission(input=["fine", ""]), EmptyInput),
    (Submission(input=["llama " * 600]), InputTooLong),
    (Submission(input=[[1, 2, 10**6]]), BadInput),
    (Submission(input=["x"], dimensions=64), UnsupportedParameter),
    (Submission(input=["x"], max_tokens=8, prompt="also a prompt"), InvalidRequest),
    (Submission(input=["x"], fee=1), InsufficientFee),
])
def test_bad_embedding_requests_are_refused_with_nothing_held(life: Any, sub: Submission, error: type) -> None:
    svc, transport, key = life
    with pytest.raises(error):
        svc.submit(key, sub)
    assert books(svc, key) == (DEPOSIT, []) and not transport.outbox


def test_an_input_too_long_names_both_numbers(life: Any) -> None:
    svc, _, key = life
    with pytest.raises(InputTooLong) as refused:
        svc.submit(key, Submission(input=["short", "llama " * 600]))
    assert refused.value.param == "input[1]" and refused.value.n_ctx == N_CTX and refused.value.tokens > N_CTX


def test_dimensions_at_the_models_own_size_are_accepted(life: Any, worker: Any) -> None:
    svc, transport, key = life
    doc = svc.submit(key, Submission(input=["x"], dimensions=576))
    transport.join(svc, run_worker(worker))
    assert transport.responses[doc["job_id"]]["status"] == "done"


def test_a_result_without_a_vector_per_input_is_refunded_not_charged(life: Any) -> None:
    svc, transport, key = life
    doc = svc.submit(key, Submission(input=list(TEXTS)))
    # A worker that answers with text, not vectors: signed, yet no answer to what was paid for.
    transport.join(svc, stub.scripted_worker(svc.public_key, svc.counter.models(), "not a vector"))
    response = transport.responses[doc["job_id"]]
    assert response["status"] == "failed" and response["error"] == "EmbeddingsMissing"
    assert response["charged"] == 0 and books(svc, key) == (DEPOSIT, [])


def test_retention_erases_the_inputs_and_the_vectors(life: Any, worker: Any) -> None:
    svc, transport, key = life
    doc = svc.submit(key, Submission(input=["a private sentence"]))
    transport.join(svc, run_worker(worker))
    with svc.sessions.begin() as s:
        row = s.query(JobRow).filter_by(id=doc["job_id"]).one()
        retention.erase_row(row, now=0.0)
        erased = views.response(row)
        assert "a private sentence" not in row.request and "input" not in json.loads(row.request)
    assert erased["choices"][0].get("embedding") is None and erased["prompt_tokens"] > 0
