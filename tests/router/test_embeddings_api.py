"""Embeddings on the running stack (real worker, herder and gateway processes): the official ``openai``
client, the Python client and ``llamas embed``, each charged exactly."""

from __future__ import annotations

import base64
import json
import subprocess
import sys

import httpx
import numpy as np
import openai
import pytest

from llama_tasks import embedding_job
from tests.processes import ROOT
from tests.stack import running_stack

pytestmark = pytest.mark.slow

TEXTS = ["A llama grazes on the hill.", "Alpacas are smaller than llamas.", "The stock market fell today."]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url):
    """The whole service once: the ledger backends are the in-process tests' to cover."""
    yield from running_stack("sqlite", tmp_path_factory)


@pytest.fixture(scope="module")
def gateway(stack):
    return stack.gateway_url()


def client(gateway: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway + "/v1", api_key=key, max_retries=0)


def test_float_and_base64_embeddings_through_the_openai_client(stack, gateway):
    key, _ = stack.account(10_000)
    oa = client(gateway, key)
    floats = oa.embeddings.create(model="smollm2", input=TEXTS, encoding_format="float",
                                  extra_body={"multiplier": 1.5})
    vectors = np.array([d.embedding for d in floats.data])
    assert vectors.shape == (3, 576) and np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert vectors[0] @ vectors[1] > max(vectors[0] @ vectors[2], vectors[1] @ vectors[2])
    job_id = floats.model_extra["id"].removeprefix("embd-")
    row = stack.job(job_id)
    usage = floats.usage.model_dump()
    assert usage["prompt_tokens"] == usage["total_tokens"] == row.prompt_tokens
    assert row.quote == 1 + row.prompt_tokens and usage["charged"] == row.charged == row.offered
    # Answered by its first attempt: the worker's task ended well (none failed and went again).
    assert row.attempt == 1 and row.error is None
    assert "raised unexpected" not in stack.worker.output()
    b64 = oa.embeddings.create(model="smollm2", input=TEXTS[0], encoding_format="base64")
    decoded = np.frombuffer(base64.b64decode(b64.data[0].embedding), dtype="<f4")
    assert float(decoded @ vectors[0]) > 0.999
    assert stack.balance(key) == 10_000 - usage["charged"] - b64.usage.model_dump()["charged"]
    assert stack.books() == []


def test_a_bad_input_is_a_400_with_nothing_held(stack, gateway):
    key, _ = stack.account(1_000)
    for body in ({"input": ""}, {"input": ["llama " * 3000]}, {"input": "x", "dimensions": 8}):
        reply = httpx.post(gateway + "/v1/embeddings", json=body, headers={"Authorization": f"Bearer {key}"},
                           timeout=60)
        assert reply.status_code == 400, reply.text
    assert stack.balance(key) == 1_000


def test_the_python_client_embeds_and_quotes(stack):
    key, herder = stack.account(10_000)
    quote = herder.embedding_quote(TEXTS)
    doc = herder.embed(TEXTS, multiplier=2)
    assert doc["prompt_tokens"] == quote["prompt_tokens"] and doc["charged"] == 2 * quote["quote"]
    assert len(doc["embeddings"]) == 3 and all(len(v) == 576 for v in doc["embeddings"])
    assert [embedding_job.decode_vector(c["embedding"]) for c in doc["choices"]] == doc["embeddings"]
    assert stack.balance(key) == 10_000 - doc["charged"] and stack.books() == []


def test_llamas_embed(stack):
    key, _ = stack.account(10_000)
    env = dict(stack.env, LLAMAS_API_KEY=key, COLUMNS="200")
    res = subprocess.run([sys.executable, "-m", "router.cli", "embed", *TEXTS[:2], "--json"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["status"] == "done" and len(doc["embeddings"]) == 2
    shown = subprocess.run([sys.executable, "-m", "router.cli", "embed", "hello"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "576 dims" in shown.stdout and "charged" in shown.stderr
    assert stack.balance(key) == 10_000 - doc["charged"] - int(shown.stderr.split("charged ")[1].split(",")[0])


def test_the_texts_embedded_stay_out_of_the_logs(stack, gateway):
    key, _ = stack.account(1_000)
    secret = "zebra-violet-canary embeds quietly"
    client(gateway, key).embeddings.create(model="smollm2", input=[secret, secret + " again"])
    logs = {"herder": stack.herder.output(), "worker": stack.worker.output(),
            "gateway": (stack.tmp / "gateway.log").read_text(errors="replace")}
    assert [name for name, text in logs.items() if "zebra-violet-canary" in text] == []
