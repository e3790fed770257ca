"""``POST /v1/embeddings`` in process: the official ``openai`` client against the real gateway and herder core,
the worker's own code embedding on the bundled model as soon as a job is admitted; bad input is a 400 with
nothing held."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import redis
from fastapi.testclient import TestClient

from llama_tasks import runtime, signing
from llama_tasks.placement import place
from llama_tasks.settings import WorkerSettings
from router.core import ledger
from router.core.models import JobRow
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.gateway.app import create_app
from router.herder import stub

DEPOSIT = 100_000
N_CTX = 512
TEXTS = ["Llamas hum to each other.", "A cria is a baby llama.", "Interest rates rose again."]


@pytest.fixture(scope="module")
def worker(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[runtime.ProcessContext]:
    home = tmp_path_factory.mktemp("embed-gateway-worker")
    signing.write_private(home / "house.key", stub.HOUSE.key)
    signing.generate_keypair(home)
    settings = WorkerSettings(home=home, redis_url=redis_url, slots=2, n_ctx=N_CTX,
                              public_key=(home / "herder.pub").read_text().strip())
    ctx = runtime.start_process(settings, place(None, 1), slots=2)
    yield ctx
    ctx.engine.stop()


class Gateway:
    """The gateway on a stub herder whose admitted jobs the worker runs before ``submit`` returns."""

    def __init__(self, svc: HerderService, transport: stub.StubTransport, key: str, ctx: Any) -> None:
        self.svc, self.key = svc, key
        submit = svc.submit_counted

        def submit_and_run(api_key: str, sub: Any) -> tuple[dict[str, Any], Any]:
            admitted = submit(api_key, sub)
            transport.join(svc, lambda env, task_id: runtime.run_envelope(ctx, env, task_id, "inline@test"))
            return admitted

        svc.submit_counted = submit_and_run  # type: ignore[method-assign]
        self.http = TestClient(create_app(lambda: svc), raise_server_exceptions=False)
        self.openai = openai.OpenAI(base_url="http://testserver/v1", api_key=key, max_retries=0, http_client=self.http)

    def post(self, body: Any) -> Any:
        return self.http.post("/v1/embeddings", json=body, headers={"Authorization": f"Bearer {self.key}"})

    def books(self) -> tuple[int, int, list[str]]:
        """The account's balance, the jobs admitted, and what the ledger check finds wrong."""
        with self.svc.sessions.begin() as s:
            return (ledger.balance(s, ledger.account_by_key(s, self.key)), s.query(JobRow).count(),
                    ledger.check(s))


@pytest.fixture
def gw(tmp_path: Path, redis_url: str, worker: runtime.ProcessContext) -> Iterator[Gateway]:
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, n_ctx=N_CTX, base_fee=2,
                              fee_per_embedding_token=3)
    transport = stub.StubTransport(handles=redis.Redis.from_url(redis_url))
    svc = stub.build(settings, transport=transport, slots=2, key=signing.load_private(worker.settings.home / "herder.key"))
    with svc.sessions.begin() as s:
        _, key = ledger.create_account(s, "embeddings", DEPOSIT)
    gateway = Gateway(svc, transport, key, worker)
    with gateway.http:  # one event loop for every request: the gateway's Redis client lives on it
        yield gateway


def test_float_embeddings_through_the_openai_client_are_charged_exactly(gw: Gateway) -> None:
    reply = gw.openai.embeddings.create(model="smollm2", input=TEXTS, encoding_format="float",
                                        extra_body={"multiplier": 2})
    assert reply.object == "list" and reply.model == "smollm2"
    assert [d.index for d in reply.data] == [0, 1, 2] and all(d.object == "embedding" for d in reply.data)
    vectors = np.array([d.embedding for d in reply.data])
    assert vectors.shape == (3, 576) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    usage = reply.usage.model_dump()
    assert usage["prompt_tokens"] == usage["total_tokens"] > 3
    quote = 2 + 3 * usage["prompt_tokens"]
    assert usage["offered"] == usage["charged"] == 2 * quote and usage["refunded"] == 0
    assert gw.books() == (DEPOSIT - usage["charged"], 1, [])


def test_base64_embeddings_are_little_endian_float32_of_the_same_vectors(gw: Gateway) -> None:
    floats = gw.openai.embeddings.create(model="smollm2", input="Llamas hum to each other.", encoding_format="float")
    raw = gw.post({"model": "smollm2", "input": "Llamas hum to each other.", "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
    assert np.array_equal(decoded, np.array(floats.data[0].embedding, dtype=np.float32))
    # Asked for base64 by name, the SDK hands back the string; asked for nothing, it asks for base64 and decodes.
    b64 = gw.openai.embeddings.create(model="smollm2", input=[[1, 2, 3]], encoding_format="base64")
    assert isinstance(b64.data[0].embedding, str) and len(base64.b64decode(b64.data[0].embedding)) == 4 * 576
    default = gw.openai.embeddings.create(model="smollm2", input="Llamas hum to each other.")
    assert default.data[0].embedding == floats.data[0].embedding
    assert gw.books()[2] == []


def test_token_arrays_and_the_models_own_dimensions_are_taken(gw: Gateway) -> None:
    reply = gw.post({"input": [[1, 2, 3], [4, 5]], "dimensions": 576, "user": "someone"})
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] == 5 and len(reply.json()["data"]) == 2


@pytest.mark.parametrize(("body", "param"), [
    ({"input": ""}, "input[0]"),
    ({"input": []}, "input"),
    ({"input": ["ok", ""]}, "input[1]"),
    ({"input": [[]]}, "input[0]"),
    ({}, "input"),
    ({"input": 5}, "input"),
    ({"input": [["a"]]}, "input[0]"),
    ({"input": [[1, 99_999_999]]}, "input[0]"),
    ({"input": ["llama " * 600]}, "input[0]"),
    ({"input": "x", "dimensions": 64}, "dimensions"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "max_tokens": 5}, "max_tokens"),
    ({"input": "x", "user": 7}, "user"),
])
def test_bad_requests_are_400_in_openai_shape_with_nothing_held(gw: Gateway, body: dict[str, Any],
                                                                param: str) -> None:
    reply = gw.post(body)
    assert reply.status_code == 400, reply.text
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]
    assert gw.books() == (DEPOSIT, 0, [])


def test_an_input_too_long_says_both_numbers(gw: Gateway) -> None:
    error = gw.post({"input": ["short", "llama " * 600]}).json()["error"]
    assert error["code"] == "InputTooLong" and error["n_ctx"] == N_CTX and error["tokens"] > N_CTX
    assert str(N_CTX) in error["message"] and str(error["tokens"]) in error["message"]


def test_an_offer_below_the_quote_is_402_and_no_key_is_401(gw: Gateway) -> None:
    reply = gw.post({"input": "x", "fee": 1})
    assert reply.status_code == 402 and int(reply.headers["X-Needed"]) > 1
    assert gw.http.post("/v1/embeddings", content=json.dumps({"input": "x"})).status_code == 401
    assert gw.books() == (DEPOSIT, 0, [])


def test_info_shows_the_fee_per_embedding_token_and_the_docs_the_endpoint(gw: Gateway) -> None:
    info = gw.http.get("/info").json()
    assert info["fee_per_embedding_token"] == 3 and info["base_fee"] == 2
    body = gw.http.get("/openapi.json").json()["paths"]["/v1/embeddings"]["post"]["requestBody"]
    assert set(body["content"]["application/json"]["schema"]["properties"]) >= {"input", "encoding_format"}
