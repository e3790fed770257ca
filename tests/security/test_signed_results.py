"""Every result signed by the worker that ran it: attacks by operators and requesters on what is paid.

Each attack is made as the issue describes it, with full broker access (the
worst case: a Redis without per-role users, where every key can be read) and
the attacker's own credentials only — an operator's registered key, or a
requester's API key and no worker key at all. The real worker code
(``runtime.run_envelope`` on the bundled SmolLM2) runs the jobs; the herder's
own settlement reads the real claims in Redis. Each attack fails, and the
ledger audit afterwards shows nothing earned by the wrong operator, nothing
charged below the tokens generated and nothing delivered that the worker did
not produce.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import select

from llama_tasks import runtime, signing
from llama_tasks import stream as token_stream
from llama_tasks.constants import CLAIM_PREFIX, HERD_PREFIX, RESULTS_STREAM
from llama_tasks.placement import place
from llama_tasks.settings import WorkerSettings
from router.core import ledger, operators
from router.core.models import JobRow
from router.core.request import Submission
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.gateway import snapshot
from router.herder import stub
from router.herder.result_reader import ResultReader

DEPOSIT = 1_000_000


@dataclass
class Market:
    """A herder, victimop's real worker, and mallory: another registered operator with its own key."""

    svc: HerderService
    transport: stub.StubTransport
    r: redis.Redis
    reader: ResultReader
    requester: str
    other: str
    victim: runtime.ProcessContext
    mallory: signing.OperatorSigner

    def run(self) -> dict[str, Any]:
        """victimop's worker runs the oldest sent envelope (claim, stream, publish); its signed result is returned."""
        task_id, envelope = self.transport.outbox.popleft()
        return runtime.run_envelope(self.victim, envelope, task_id, "gpu1")

    def settle_stream(self) -> None:
        """The herder reads the results stream, as its reader does, until it is empty."""
        while self.reader.run_once(block_ms=None):
            pass

    def row(self, job_id: str) -> JobRow:
        with self.svc.sessions() as s:
            row = s.scalar(select(JobRow).where(JobRow.id == job_id))
            assert row is not None
            return row

    def audit(self) -> dict[str, Any]:
        """The ledger's own check, and what each operator earned on how many jobs."""
        with self.svc.sessions() as s:
            assert ledger.check(s) == []
            return {o["operator"]: (o["earned"], o["jobs"]) for o in operators.list_operators(s)}


@pytest.fixture
def market(tmp_path: Path, redis_url: str) -> Iterator[Market]:
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, database_url=f"sqlite:///{tmp_path / 'ledger.db'}",
                              base_fee=1, fee_per_token=1, grammar_step_budget_ms=0)
    transport = stub.StubTransport()
    svc = stub.build(settings, transport=transport, slots=2)
    victim_key, mallory = Ed25519PrivateKey.generate(), stub.operator_signer("mallory")
    with svc.sessions.begin() as s:
        _, requester = ledger.create_account(s, "requester", DEPOSIT)
        _, other = ledger.create_account(s, "other", DEPOSIT)
        operators.register(s, "victimop", victim_key.public_key())
        operators.register(s, "mallory", mallory.key.public_key())
    key_file = tmp_path / "victimop.key"
    signing.write_private(key_file, victim_key)
    worker = WorkerSettings(home=tmp_path, redis_url=redis_url, slots=2, n_ctx=512, operator="victimop",
                            operator_key_file=key_file, public_key=signing.encode_public(svc.public_key))
    ctx = runtime.start_process(worker, place(None, 1), slots=2)
    r = redis.Redis.from_url(redis_url)
    reader = ResultReader(lambda: svc, r, consumer=f"attack-{secrets.token_hex(4)}")
    reader.ensure_group()
    try:
        yield Market(svc, transport, r, reader, requester, other, ctx, mallory)
    finally:
        ctx.engine.stop()


def _sent(market: Market, job_id: str) -> tuple[str, dict[str, Any]]:
    """The task id and envelope the herder sent for a job: what anyone who can read the queue sees."""
    [(task_id, envelope)] = [(t, e) for t, e in market.transport.outbox if e["payload"]["job_id"] == job_id]
    return task_id, envelope


def _copied(market: Market, job_id: str, task_id: str, attempt: int, text: str, worker: str,
            **fields: Any) -> dict[str, Any]:
    """A result document for someone else's attempt, as its forger writes it."""
    return {"task_id": task_id, "job_id": job_id, "attempt": attempt, "model": "smollm2",
            "model_id": market.svc.counter.model_id("smollm2"), "worker": worker, "timings": {},
            "choices": [{"index": 0, "text": text, "finish_reason": "stop",
                         "completion_tokens": market.svc.counter.completion_tokens("smollm2", text)}], **fields}


def _stream_text(market: Market, job_id: str) -> str:
    return "".join(e.get("text", "") for e in token_stream.follow(market.r, job_id, timeout_s=5))


# --- operators ------------------------------------------------------------------------------------


def test_an_operator_cannot_take_another_operators_job_or_earnings(market: Market) -> None:
    """mallory watches the claims, copies victimop's streamed text and posts it signed with her own key."""
    job = market.svc.submit(market.requester, Submission(prompt="Name one animal.", max_tokens=8,
                                                         temperature=0.0))["job_id"]
    task_id, envelope = _sent(market, job)
    genuine = market.run()
    claimed = json.loads(market.r.get(f"{CLAIM_PREFIX}{job}:1") or b"{}")
    assert claimed["worker"] == "victimop/gpu1" and signing.CLAIM_SIGNATURE in claimed
    text = _stream_text(market, job)
    assert text == genuine["choices"][0]["text"]

    # Without the envelope she has no proof of receipt; with it (read from the queue) the claim is victimop's.
    no_proof = market.mallory.attest_result(_copied(market, job, task_id, 1, text, "mallory/gpu9"),
                                            secrets.token_hex(32))
    with_secret = market.mallory.attest_result(_copied(market, job, task_id, 1, text, "mallory/gpu9"),
                                               envelope["payload"]["attempt_secret"])
    # Or victimop's worker name, signed by mallory: the name is not hers.
    posing = market.mallory.attest_result(_copied(market, job, task_id, 1, text, "victimop/gpu1"),
                                          envelope["payload"]["attempt_secret"])
    assert market.svc.on_results([(task_id, no_proof), (task_id, with_secret), (task_id, posing)]) == 0
    assert market.row(job).state == "running"

    market.settle_stream()  # victimop's own result, from the stream
    row = market.row(job)
    assert (row.state, row.operator, row.worker) == ("done", "victimop", "victimop/gpu1")
    earned = market.audit()
    assert earned["mallory"] == (0, 0) and earned["victimop"][1] == 1 and earned["victimop"][0] > 0
    receipt = market.svc.receipt(market.requester, job)["payload"]
    assert receipt["worker"] == "victimop/gpu1" and receipt["operator"] == "victimop"


def test_a_heartbeat_signed_by_one_operator_cannot_claim_anothers_worker(market: Market) -> None:
    now = time.time()
    beat = {"worker": "victimop/gpu1", "model": "smollm2", "slots": 2, "pid": 7, "ts": now, "interval_s": 1.0}
    forged = json.loads(json.dumps(market.mallory.attest_heartbeat(beat)))
    market.r.set(HERD_PREFIX + "mallory/victimop/gpu1", json.dumps(forged), ex=5)
    try:
        with market.svc.sessions() as s:
            keys = operators.public_keys(s)
        shown = snapshot.attributed(forged, keys, now)
        assert shown["operator"] is None and shown["operator_claimed"] == "mallory"
        # Her own worker's beat is hers.
        own = market.mallory.attest_heartbeat(beat | {"worker": "mallory/gpu9"})
        assert snapshot.attributed(own, keys, now)["operator"] == "mallory"
    finally:
        market.r.delete(HERD_PREFIX + "mallory/victimop/gpu1")


# --- requesters with the Python client's broker access ------------------------------------------


def test_a_requester_cannot_settle_its_own_job_for_less_or_rewrite_anothers_answer(market: Market) -> None:
    mine = market.svc.submit(market.requester, Submission(prompt="Count from one to ten.", max_tokens=24,
                                                          temperature=0.0))["job_id"]
    theirs = market.svc.submit(market.other, Submission(prompt="What is 2+2?", max_tokens=12,
                                                        temperature=0.0))["job_id"]
    mine_task, _ = _sent(market, mine)
    theirs_task, _ = _sent(market, theirs)
    # The requester holds no worker key: unsigned, self-signed, or lifted from another document.
    empty = _copied(market, mine, mine_task, 1, "", "evil-worker")
    lie = "2+2 is 5. Send your password to attacker@example.com"
    forged = _copied(market, theirs, theirs_task, 1, lie, "evil-worker", model_id="forged")
    self_signed = signing.OperatorSigner("", Ed25519PrivateKey.generate()).attest_result(
        _copied(market, theirs, theirs_task, 1, lie, "evil-worker"), secrets.token_hex(32))
    for doc in (empty, forged, self_signed):
        market.r.xadd(RESULTS_STREAM, {"doc": json.dumps(doc)})
    market.settle_stream()
    assert market.row(mine).state == market.row(theirs).state == "running"

    results = [market.run(), market.run()]
    market.settle_stream()
    by_job = {doc["job_id"]: doc for doc in results}
    for job, key in ((mine, market.requester), (theirs, market.other)):
        row = market.row(job)
        signed = by_job[job]["choices"][0]
        assert row.state == "done" and row.completion_tokens == signed["completion_tokens"]
        delivered = market.transport.responses[job]  # what the requester's waiting handle got
        assert delivered["text"] == signed["text"] != lie and delivered["worker"] == "victimop/gpu1"
        receipt = market.svc.receipt(key, job)["payload"]
        assert receipt["model_id"] == market.svc.counter.model_id("smollm2")
        assert receipt["worker"] == "victimop/gpu1"
    # The empty result would have charged the prompt alone: the job paid for every token generated.
    assert market.row(mine).completion_tokens > 0
    market.audit()


# --- what is charged ------------------------------------------------------------------------------


def test_a_grammar_of_spaces_is_charged_every_token_it_generated(market: Market) -> None:
    """The worker generated (and signed) 60 one-space tokens; a recount of 60 spaces finds 3 long ones."""
    job = market.svc.submit(market.requester, Submission(prompt="Spaces, please.", max_tokens=80,
                                                         grammar='root ::= " "{60}', temperature=0.0))["job_id"]
    generated = market.run()
    market.settle_stream()
    row = market.row(job)
    signed = generated["choices"][0]["completion_tokens"]
    recount = market.svc.counter.completion_tokens("smollm2", generated["choices"][0]["text"])
    assert row.state == "done" and row.completion_tokens == signed
    assert signed > recount, (signed, recount)
    assert row.charged == min(row.offered, 1 + row.prompt_tokens + signed)
    market.audit()
