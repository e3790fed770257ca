"""Bounded work and a private prompt cache, attacked as a tenant with an API key would (issue items 1-3).

1. A grammar whose parse stacks multiply froze a worker's batch loop inside
   llama.cpp's sampler for everyone: it is now refused at admission, and a
   sampler that stalls anyway is cut off by the worker's watchdog.
2. ``cached_tokens`` told one account how much of its prompt another had
   just sent (the vault code, digit by digit): a cached prefix now serves only
   its own account, beyond the chat template's public text.
3. A generation past its time limit was refused in full although its text was
   made (and streamed): it is now charged for what it made and answered 504.

The quick cases run the real gateway and herder core in process; the others
run the whole service (herder, gateway and a real SmolLM2 worker) and audit
the ledger after each attack.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from router.core import ledger
from router.core.models import DONE, FAILED
from router.core.request import Submission
from router.gateway.app import create_app
from tests.processes import wait_for
from tests.security.test_fair_shares import account, audit, auth, build
from tests.stack import Stack, fresh_ledger

#: The issue's grammar: compiles at once, then one token of it takes hours inside the sampler.
FREEZER = 'root ::= (("a"{0,30}){0,30}){0,30}'
SECRET = "Remember this. The vault access code for customer Alice is 7391. Never tell anyone."


def balance(svc: Any, key: str) -> int:
    with svc.sessions() as session:
        return ledger.balance(session, ledger.account_by_key(session, key))


def test_the_freezing_grammar_is_refused_at_admission_with_nothing_held(tmp_path: Path, redis_url: str) -> None:
    svc, _ = build(tmp_path, redis_url, inline=False)
    attacker = account(svc, "attacker")
    before = balance(svc, attacker)
    with TestClient(create_app(lambda: svc)) as client:
        for body in ({"model": "smollm2", "prompt": "Say a:", "max_tokens": 5, "grammar": FREEZER},
                     {"model": "smollm2", "messages": [{"role": "user", "content": "Say a:"}], "max_tokens": 5,
                      "grammar": 'root ::= (("a"{0,5}){0,5}){0,5}'}):
            path = "/v1/completions" if "prompt" in body else "/v1/chat/completions"
            reply = client.post(path, json=body, headers=auth(attacker))
            assert reply.status_code == 422, reply.text
            assert reply.json()["error"]["code"] == "GrammarTooCostly"
    # An honest grammar and a JSON schema still pass the same checks.
    schema = {"type": "object", "properties": {"mood": {"type": "integer", "minimum": 1, "maximum": 5}},
              "required": ["mood"]}
    messages = [{"role": "user", "content": "Grade: great!"}]
    for extra in ({"grammar": "root ::= [1-5]"}, {"json_schema": schema}):
        assert svc.quote(Submission(messages=messages, max_tokens=8, **extra))["quote"] > 0
    assert balance(svc, attacker) == before
    audit(svc)


# --- the whole service --------------------------------------------------------------------


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    """Herder, gateway and one single-slot SmolLM2 worker: every job lands in the slot the last one used.

    The probe is off here (budget 0), so the freezing grammar reaches the
    worker and its watchdog is what is tried; a generation may take 3 s.
    """
    tmp = tmp_path_factory.mktemp("bounded")
    env = dict(
        os.environ,
        LLAMAS_DATABASE_URL=fresh_ledger("sqlite", tmp),
        LLAMAS_TICK_S="0.5", LLAMAS_THREADS="1",
        LLAMAS_SOFT_TIME_LIMIT_S="3", LLAMAS_TIME_LIMIT_S="30", LLAMAS_VISIBILITY_TIMEOUT_S="60",
        LLAMAS_LEASE_GRACE_S="5", LLAMAS_SAMPLE_LIMIT_S="2", LLAMAS_GRAMMAR_STEP_BUDGET_MS="0",
    )
    stack = Stack(tmp, env["LLAMAS_DATABASE_URL"], env)
    try:
        yield stack
    finally:
        stack.stop()
        stack.sessions.kw["bind"].dispose()


def post(stack: Stack, key: str, body: dict[str, Any], timeout: float = 120) -> httpx.Response:
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    return httpx.post(stack.gateway_url() + path, json={"model": "smollm2", **body}, headers=auth(key),
                      timeout=timeout)


def cached(reply: httpx.Response) -> int:
    assert reply.status_code == 200, reply.text
    return int(reply.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


@pytest.mark.slow
def test_another_account_cannot_read_a_prompt_from_the_cache(service: Stack) -> None:
    victim, _ = service.account(1_000_000)
    attacker, _ = service.account(1_000_000)
    ask = {"messages": [{"role": "user", "content": SECRET}], "max_tokens": 1, "temperature": 0}
    post(service, victim, ask)
    own = cached(post(service, victim, ask))  # the victim's own cache still serves it
    assert own > 20
    seen = {}
    for guess in ("7391", "7000", "1234"):
        post(service, victim, ask)  # the secret is back in the one slot
        probe = {**ask, "messages": [{"role": "user", "content": SECRET.replace("7391", guess)}]}
        seen[guess] = cached(post(service, attacker, probe))
    # The right guess reads like the wrong ones, and no more than the template's own text is ever shared.
    assert len(set(seen.values())) == 1 and seen["7391"] < own - 10
    assert service.books() == []


@pytest.mark.slow
def test_a_generation_cut_by_its_time_limit_is_charged_for_what_it_made_and_answered_504(service: Stack) -> None:
    key, _ = service.account(1_000_000)
    before = service.balance(key)
    # 1,999 letters and nothing else: at three letters a token, 660 tokens, far more than one thread
    # makes in its 3 s.
    reply = post(service, key, {"prompt": "Letters:", "max_tokens": 2000, "grammar": "root ::= [a-z]{1999}"})
    assert reply.status_code == 504, reply.text
    error = reply.json()["error"]
    assert error["type"] == "GenerationTimedOut" and error["usage"]["completion_tokens"] > 0
    row = service.job(error["job_id"])
    assert row.state == FAILED and 0 < row.charged == error["usage"]["charged"] < row.offered
    assert service.balance(key) == before - row.charged
    assert service.captures(row.id) == 1 and service.books() == []


@pytest.mark.slow
def test_a_sampler_that_stalls_is_cut_off_and_another_tenants_job_is_answered(service: Stack) -> None:
    attacker, _ = service.account(1_000_000)
    bystander, _ = service.account(1_000_000)
    worker_pid = service.worker.proc.pid
    frozen = httpx.post(service.gateway_url() + "/v1/completions", headers=auth(attacker), timeout=120, json={
        "model": "smollm2", "prompt": "Say a:", "max_tokens": 5, "grammar": FREEZER, "stream": False})
    # The watchdog answered the stuck job with what it made (a time limit's ending) and ended the worker.
    assert frozen.status_code == 504, frozen.text
    assert frozen.json()["error"]["type"] == "GenerationTimedOut"
    assert wait_for(lambda: service.worker.proc.poll() is not None, 60, "the stalled worker to exit")
    assert service.worker.proc.returncode == 75
    # Its spinning thread went with it: the pid is gone, not burning a core.
    assert not Path(f"/proc/{worker_pid}").exists() or "zombie" in Path(f"/proc/{worker_pid}/status").read_text()
    # A supervisor starts a fresh worker, and the other tenant is served.
    service.replace_worker()
    reply = post(service, bystander, {"prompt": "Say hi:", "max_tokens": 4})
    assert reply.status_code == 200, reply.text
    row = service.job(json.loads(reply.text)["id"].split("-", 1)[1])
    assert row.state == DONE
    assert service.books() == []


def test_cache_scopes_are_one_per_account_and_opaque_without_the_herders_key(tmp_path: Path,
                                                                              redis_url: str) -> None:
    # A worker (an operator's) sees the scope in every envelope: it must not name the account.
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from router.core.dispatch import cache_key

    house, other_house = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    scopes = {cache_key(account_id, house) for account_id in range(1, 1001)}
    assert len(scopes) == 1000  # one per account
    assert cache_key(7, house) == cache_key(7, house)  # stable, on every herder with the key
    assert cache_key(7, house) != cache_key(7, other_house) and "7" != cache_key(7, house)
    # And dispatch puts it in the signed envelope of each of an account's jobs.
    svc, transport = build(tmp_path, redis_url, inline=False)
    first, second = account(svc, "first"), account(svc, "second")
    for key in (first, first, second):
        svc.submit(key, Submission(prompt="Say a:", max_tokens=1))
    svc.dispatch()
    sent = [envelope["payload"]["cache_key"] for _, _, envelope in transport.sent]
    assert len(sent) == 3 and sent[0] == sent[1] != sent[2]


def test_many_choices_cannot_take_every_slot(tmp_path: Path, redis_url: str) -> None:
    # The n=8 job held all eight slots of the herd until its time limit, and a 500.
    svc, transport = build(tmp_path, redis_url, inline=False)  # one worker of 8 slots; 4 per account
    attacker, bystander = account(svc, "attacker"), account(svc, "bystander")
    before = balance(svc, attacker)
    with TestClient(create_app(lambda: svc)) as client:
        reply = client.post("/v1/completions", headers=auth(attacker),
                            json={"model": "smollm2", "prompt": "Say a:", "max_tokens": 64, "n": 8})
    assert reply.status_code == 422 and reply.json()["error"]["code"] == "OverRequestLimit", reply.text
    assert "n (slots at once)" in reply.json()["error"]["message"]
    assert balance(svc, attacker) == before
    # Within its share: two jobs of four choices; the second waits for the first, not the bystander.
    mine = [svc.submit(attacker, Submission(prompt="Say a:", max_tokens=64, n=4))["job_id"] for _ in range(2)]
    svc.dispatch()
    theirs = svc.submit(bystander, Submission(prompt="Say b:", max_tokens=4))["job_id"]
    svc.dispatch()
    sent = [job_id for job_id, _, _ in transport.sent]
    assert sent == [mine[0], theirs]  # 4 + 1 of 8 slots; the attacker's second job waits for its share
    audit(svc)
