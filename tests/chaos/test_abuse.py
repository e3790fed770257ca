"""Abuse: racing one account's funds, walking away from requests, envelopes the herder never signed,
one tenant steering another's sampling, webhooks aimed inside, and prompts in logs."""

from __future__ import annotations

import copy
import json
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select

from llama_tasks import signing
from llama_tasks.constants import GENERATE_TASK
from llama_tasks.errors import BadGrammar, BadSignature, LlamasError, Replayed, UnknownSigner, Unsigned
from router.core import ledger
from router.core.errors import BadChannel, InsufficientFunds
from router.core.models import Account, JobRow, Transfer
from router.gateway.errors import error_body
from tests.chaos.audit import Scenario
from tests.chaos.harness import (
    GHOST,
    LETTERS,
    LETTERS_GRAMMAR,
    SETTLE_S,
    ChaosStack,
    Ghost,
    RawRequest,
    first_token,
    prompt,
    wait_for,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

#: The race: this many requests at once against an account that can pay for exactly ``AFFORDABLE``.
RACERS, AFFORDABLE = 50, 10


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class LowWater(threading.Thread):
    """Samples an account's balance as fast as it can until stopped; keeps the lowest seen."""

    def __init__(self, stack: ChaosStack, key: str) -> None:
        super().__init__(daemon=True)
        self.stack, self.key = stack, key
        self.lowest: int | None = None
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            balance = self.stack.balance(self.key)
            self.lowest = balance if self.lowest is None else min(self.lowest, balance)
            self.done.wait(0.002)  # as fast as it can, and stops the moment it is told


@pytest.mark.chaos("50 concurrent requests against funds for 10")
@pytest.mark.parametrize("via", ["http", "client"])
def test_fifty_racing_requests_never_overdraw_an_account(chaos: ChaosStack, scenario: Scenario, ghost: Ghost,
                                                        via: str) -> None:
    text = prompt("Race me.")
    key, herder = chaos.account(1)
    # On the ghost model nothing runs, so nothing is refunded mid-race: exactly the holds compete.
    fee = herder.quote(text, 8, model=GHOST)["quote"]
    with chaos.sessions.begin() as s:
        account_id = ledger.account_by_key(s, key).id
        ledger.deposit(s, ledger.account_by_key(s, key), AFFORDABLE * fee - 1)
    funds = AFFORDABLE * fee
    watch = LowWater(chaos, key)
    watch.start()
    start = threading.Barrier(RACERS)
    body = {"model": GHOST, "prompt": text, "max_tokens": 8, "fee": fee}

    def over_http(_: int) -> tuple[int, dict[str, Any]]:
        with scenario.http() as http:
            start.wait()
            reply = http.post("/v1/completions", json=body, headers=auth(key))
            return reply.status_code, reply.json()

    def over_client(_: int) -> Any:
        start.wait()
        try:
            return herder.run(text, 8, model=GHOST, fee=fee)
        except LlamasError as exc:
            return exc

    def admitted() -> list[str]:
        with chaos.sessions.begin() as s:
            return list(s.scalars(select(JobRow.id).where(JobRow.account_id == account_id)))

    def refused(futures: list[Any]) -> int:
        # Admitted HTTP requests wait for an answer (the ghost runs nothing); admitted client calls return a handle.
        return sum(1 for f in futures if f.done() and (via == "http" or isinstance(f.result(), Exception)))

    scenario.sent(RACERS)
    with ThreadPoolExecutor(RACERS) as pool:
        futures = [pool.submit(over_http if via == "http" else over_client, i) for i in range(RACERS)]
        wait_for(lambda: refused(futures) + len(admitted()) >= RACERS, "every racer to be admitted or refused", 120)
        jobs = admitted()
        assert len(jobs) <= AFFORDABLE, f"{len(jobs)} jobs admitted against funds for {AFFORDABLE}"
        assert len(jobs) == AFFORDABLE, f"only {len(jobs)} admitted though the funds pay for {AFFORDABLE}"
        for job_id in jobs:  # each refunded in full, through the same door it came in
            if via == "http":
                with scenario.http() as http:
                    assert http.delete(f"/jobs/{job_id}", headers=auth(key)).status_code == 200
            else:
                herder.job(job_id).cancel()
        outcomes = [f.result(timeout=60) for f in futures]
    watch.done.set()
    watch.join()
    if via == "http":
        refusals = [doc for status, doc in outcomes if status == 402]
        assert all(doc["error"]["code"] == "InsufficientFunds" for doc in refusals)
        assert sorted({status for status, _ in outcomes}) == [402, 409], [s for s, _ in outcomes]
    else:
        refusals = [o for o in outcomes if isinstance(o, InsufficientFunds)]
    assert len(refusals) == RACERS - AFFORDABLE, outcomes
    assert watch.lowest is not None and watch.lowest >= 0, watch.lowest
    assert chaos.balance(key) == funds


def _disconnect_body(mode: str, when: str, ref: str) -> tuple[str, dict[str, Any]]:
    body: dict[str, Any] = {"reference": ref, "stream": mode == "stream"}
    if when == "queued":
        body |= {"model": GHOST, "max_tokens": 8}
    else:
        body |= {"model": "smollm2", "max_tokens": LETTERS, "grammar": LETTERS_GRAMMAR, "temperature": 0.0}
    if mode == "stream":
        return "/v1/chat/completions", body | {"messages": [{"role": "user", "content": prompt("Wait for me.")}]}
    return "/v1/completions", body | {"prompt": prompt("Wait for me.")}


@pytest.mark.chaos("client disconnects")
@pytest.mark.parametrize("when", ["queued", "running"])
@pytest.mark.parametrize("mode", ["plain", "stream"])
def test_a_client_that_goes_away_is_refunded_if_queued_and_charged_if_running(
        chaos: ChaosStack, scenario: Scenario, request: pytest.FixtureRequest, mode: str, when: str) -> None:
    if when == "queued":
        request.getfixturevalue("ghost")
    key, _ = chaos.account(100_000)
    ref = f"leaver-{uuid.uuid4().hex}"
    path, body = _disconnect_body(mode, when, ref)
    scenario.sent()

    def reached() -> JobRow | None:
        row = chaos.by_reference(ref)
        return row if row is not None and row.state == when else None

    if mode == "plain":
        raw = RawRequest(chaos.gateway, path, key, body)
        job_id = wait_for(reached, f"the job to be {when}").id
        if when == "running":
            first_token(chaos, job_id)
        raw.close()
    else:
        with scenario.http() as http, http.stream("POST", path, json=body, headers=auth(key)) as reply:
            assert reply.status_code == 200
            job_id = reply.headers["X-Llamas-Job"]
            lines = reply.iter_lines()  # kept: dropping it would close the connection already
            assert next(lines).startswith("data: ")  # the role chunk: the client has started reading
            wait_for(reached, f"the job to be {when}")
            if when == "running":
                while '"content"' not in (line := next(lines)) or '"content":""' in line:
                    pass  # until a piece of text: the generation is under way
    row = chaos.final(job_id)
    if when == "queued":
        assert (row.state, row.charged, row.refunded) == ("cancelled", 0, row.offered), (row.state, row.error)
        assert chaos.balance(key) == 100_000
    else:
        assert row.state == "done" and row.charged and chaos.captures(job_id) == 1, (row.state, row.error)
        assert chaos.balance(key) == 100_000 - row.charged


def _ledger_snapshot(stack: ChaosStack) -> tuple[int, int, dict[str, int]]:
    with stack.sessions.begin() as s:
        transfers = s.scalar(select(func.count()).select_from(Transfer)) or 0
        jobs = s.scalar(select(func.count()).select_from(JobRow)) or 0
        balances = {name: int(b) for name, b in s.execute(select(Account.name, Account.balance))}
    return transfers, jobs, balances


def _herder_idle(stack: ChaosStack) -> bool:
    # Settlement callbacks are acked late: an empty herder queue and no unacked message means all were handled.
    return stack.r.llen("herder") == 0 and stack.r.hlen("unacked") == 0


@pytest.mark.chaos("forged, unsigned and replayed envelopes")
def test_envelopes_the_herder_did_not_sign_generate_and_charge_nothing(chaos: ChaosStack,
                                                                       scenario: Scenario) -> None:
    key, herder = chaos.account(100_000)
    real = herder.run(prompt("Letters:"), LETTERS, grammar=LETTERS_GRAMMAR, temperature=0.0)
    scenario.sent()
    real_task, envelope = chaos.envelope_in_flight(real.id)
    real.result(timeout=SETTLE_S)
    wait_for(lambda: _herder_idle(chaos), "the herder to finish settling")
    before, real_events = _ledger_snapshot(chaos), len(chaos.stream_events(real.id))

    fresh = dict(envelope["payload"], job_id=uuid.uuid4().hex)
    intruder = Ed25519PrivateKey.generate()
    tampered = copy.deepcopy(envelope)
    tampered["payload"]["max_tokens"] = 5
    attacks: list[tuple[str, Any, type[Exception] | None, str | None]] = [
        ("unsigned", {"payload": fresh}, Unsigned, None),
        ("unsigned, naming a real job", {"payload": envelope["payload"]}, Unsigned, None),
        ("signed by another key", signing.sign(fresh, intruder), UnknownSigner, None),
        ("another key posing as the herder's", signing.sign(fresh, intruder) | {"key_id": envelope["key_id"]},
         BadSignature, None),
        ("a real envelope, tampered", tampered, BadSignature, None),
        ("a real envelope, replayed", envelope, Replayed, None),
        # Its own message handed out again (as after a worker died before its ack): the kept
        # answer comes back, generated once and charged once (the asserts below).
        ("a real envelope, replayed under its own task id", envelope, None, real_task),
    ]
    app = chaos.client_app
    sent = []
    for name, forged, error, task_id in attacks:
        if task_id is not None:
            app.backend.forget(task_id)  # or the original's stored result would answer for the replay
        task_id = task_id or uuid.uuid4().hex
        # With the herder's own callbacks attached, as an intruder on the broker would try.
        result = app.send_task(GENERATE_TASK, args=[forged], queue="llama.smollm2", task_id=task_id,
                               link=app.signature("router.settle", args=(task_id,), immutable=True, queue="herder"),
                               link_error=app.signature("router.settle_error", queue="herder"))
        sent.append((name, result, error))
    scenario.sent(len(attacks))
    for name, result, error in sent:
        outcome = result.get(timeout=60, propagate=False)
        if error is None:
            assert isinstance(outcome, dict) and (outcome["job_id"], outcome["attempt"]) == (real.id, 1), name
            continue
        assert isinstance(outcome, error), f"{name}: the worker answered {outcome!r}, not {error.__name__}"
    wait_for(lambda: _herder_idle(chaos), "the herder to handle the callbacks")
    assert chaos.stream_events(fresh["job_id"]) == [], "a forged envelope was generated"
    assert len(chaos.stream_events(real.id)) == real_events, "a replayed envelope was generated again"
    assert _ledger_snapshot(chaos) == before, "money moved or a job appeared"
    assert chaos.captures(real.id) == 1


#: As random as sampling goes, letters only: never empty, and two seeds give the same text by chance
#: practically never (at temperature 1 this prompt falls into "ha ha ha…" from many seeds).
SAMPLED: dict[str, Any] = dict(temperature=2.0, top_p=1.0, min_p=0.0, grammar="root ::= [a-z ]{300}")


@pytest.mark.chaos("one account's seed vs another's sampling")
def test_one_accounts_seed_does_not_steer_anothers_sampling(chaos: ChaosStack, scenario: Scenario) -> None:
    text = prompt("Invent a name for a llama and describe it.")
    _, alice = chaos.account(100_000)
    bob_key, bob = chaos.account(100_000)
    seeded = [alice.run(text, 24, seed=7, **SAMPLED).result(timeout=SETTLE_S)["text"] for _ in range(2)]
    assert seeded[0] == seeded[1], "a seeded request did not reproduce its own text"
    unseeded = [bob.run(text, 24, **SAMPLED).result(timeout=SETTLE_S)["text"] for _ in range(2)]
    with scenario.http() as http:
        reply = http.post("/v1/completions", headers=auth(bob_key),
                          json={"model": "smollm2", "prompt": text, "max_tokens": 24, **SAMPLED})
    assert reply.status_code == 200, reply.text
    unseeded.append(reply.json()["choices"][0]["text"])
    scenario.sent(5)
    # The same worker process ran them all, one after the other: Bob's text must follow his own fresh seed.
    assert seeded[0] not in unseeded, f"Alice's seeded text {seeded[0]!r} came back to Bob: {unseeded!r}"
    assert len(set(unseeded)) == len(unseeded), f"unseeded requests repeat each other: {unseeded!r}"


INTERNAL_WEBHOOKS = [
    "http://127.0.0.1:6379/",
    "http://169.254.169.254/latest/meta-data/",
    "http://localhost/hook",
    "http://[::1]/hook",
    "http://[::ffff:127.0.0.1]/hook",
    "http://10.0.0.1/hook",
    "http://0.0.0.0/hook",
]


@pytest.mark.chaos("webhooks aimed at internal addresses")
def test_webhooks_to_internal_addresses_are_refused_before_anything_is_held(chaos: ChaosStack,
                                                                           scenario: Scenario) -> None:
    key, herder = chaos.account(10_000)
    for url in INTERNAL_WEBHOOKS:
        with pytest.raises(BadChannel) as refused:
            herder.run(prompt("Call me back."), 4, webhook=url)
        scenario.sent()
        status, body, _ = error_body(refused.value)
        assert status == 422 and body["error"]["code"] == type(refused.value).__name__, (url, status, body)
    assert chaos.balance(key) == 10_000
    with chaos.sessions.begin() as s:
        admitted = s.scalar(select(func.count()).select_from(JobRow).where(
            JobRow.account_id == ledger.account_by_key(s, key).id)) or 0
        internal = s.scalar(select(func.count()).select_from(JobRow).where(
            JobRow.webhook_url.in_(INTERNAL_WEBHOOKS))) or 0
    assert admitted == internal == 0, "a job with an internal webhook was admitted"


@pytest.mark.chaos("prompts and completions stay out of the logs")
def test_prompts_and_completions_stay_out_of_every_log(chaos: ChaosStack, scenario: Scenario, ghost: Ghost) -> None:
    """Every way a prompt enters, succeeds, fails or is refused; the audit then searches every log."""
    key, herder = chaos.account(100_000)
    # First, so that nothing queued ahead of it leaves its stream silent for long.
    streamed = herder.run(prompt("Stream a sentence."), 24)
    assert "".join(streamed.stream(timeout=SETTLE_S)) == streamed.result(timeout=SETTLE_S)["text"]
    handles = [
        herder.run(prompt("Say something memorable."), 24, callback=("requester.inference_response", "requester")),
        herder.run(messages=[{"role": "user", "content": prompt("Tell me a secret.")}], tokens=24),
    ]
    for h in handles:
        h.result(timeout=SETTLE_S)
    cancelled = herder.run(prompt("Cancel me."), 8, model=GHOST)
    cancelled.cancel()
    expired = herder.run(prompt("Expire me."), 8, model=GHOST, deadline_s=0.3)
    assert expired.response(timeout=60)["status"] == "expired"
    with pytest.raises(BadGrammar):
        herder.run(prompt("Pick:"), 5, grammar="root ::= [1-5")
    with pytest.raises(LlamasError):
        herder.run(prompt("Too long. ") * 600, 8)
    scenario.sent(7)
    with scenario.http() as http:
        chat = {"model": "smollm2", "max_tokens": 16,
                "messages": [{"role": "user", "content": prompt("Hello over HTTP.")}]}
        assert http.post("/v1/chat/completions", json=chat, headers=auth(key)).status_code == 200
        with http.stream("POST", "/v1/chat/completions", json=chat | {"stream": True}, headers=auth(key)) as r:
            assert r.status_code == 200 and "[DONE]" in r.read().decode()
        plain = {"model": "smollm2", "max_tokens": 16, "prompt": prompt("Once upon a time")}
        assert http.post("/v1/completions", json=plain, headers=auth(key)).status_code == 200
        ref = f"ref-{uuid.uuid4().hex}"
        assert http.post("/v1/completions", json=plain | {"reference": ref}, headers=auth(key)).status_code == 200
        refusals = [
            json.dumps(plain | {"reference": ref, "prompt": prompt("Another prompt, same reference.")}).encode(),
            json.dumps(plain | {"grammar": "root ::= [1-5"}).encode(),
            json.dumps(plain | {"temperature": float("nan")}).encode(),  # a NaN literal in the body
            json.dumps(plain | {"prompt": prompt("\ud800 a lone surrogate")}).encode(),  # written as \ud800
            json.dumps(plain | {"prompt": prompt("Too long. ") * 600}).encode(),
            json.dumps(chat | {"messages": [{"role": "hacker", "content": prompt("Who am I?")}]}).encode(),
        ]
        for data in refusals:
            reply = http.post("/v1/completions" if b'"prompt"' in data else "/v1/chat/completions",
                              content=data, headers=auth(key) | {"Content-Type": "application/json"})
            assert 400 <= reply.status_code < 500, (data[:200], reply.status_code, reply.text[:300])
    scenario.sent(4 + len(refusals))
    _, leaks = scenario.log_leaks()
    assert not leaks, leaks

