"""The dashboard's sign-in, its two views and its live stream, in one process on the stub transport.

The browser tests (``test_dashboard_browser.py``) drive the same routes
through Chromium against real processes; these pin down what each audience
may see.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from fastapi.testclient import TestClient

from llama_tasks.scripted import SCRIPTED_TEXT
from router.core import ledger, operators, placement, placement_store
from router.core.errors import UnknownAccount
from router.core.keys import DASHBOARD_SEEN, PLACEMENT_DECISIONS, PLACEMENT_PENDING, PLACEMENT_WAITING
from router.core.request import Submission
from router.core.settings import HerderSettings
from router.gateway import snapshot as dashboard
from router.gateway.app import create_app
from router.gateway.dashboard import COOKIE
from router.herder import stub

ADMIN_KEY = "admin-secret-key"
PROMPT = "A prompt nobody but its requester may read"


@pytest.fixture
def market(tmp_path: Path, redis_url: str, ledger_url: str) -> Iterator[dict[str, Any]]:
    """A stub herder (one slot) with two requesters, each with a finished job; alice has one running and one queued."""
    r = redis_lib.Redis.from_url(redis_url)
    r.delete(DASHBOARD_SEEN)
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, database_url=ledger_url, admin_key=ADMIN_KEY)
    transport = stub.StubTransport()
    svc = stub.build(settings, transport=transport, slots=1)
    with svc.sessions.begin() as s:
        _, alice = ledger.create_account(s, "alice", 100_000)
        _, bob = ledger.create_account(s, "bob", 100_000)
    worker = stub.scripted_worker(svc.public_key, svc.counter.models(), SCRIPTED_TEXT)
    a = svc.submit(alice, Submission(prompt=PROMPT, max_tokens=16, reference="alice-ref"))["job_id"]
    b = svc.submit(bob, Submission(prompt=PROMPT, max_tokens=16, multiplier=2))["job_id"]
    transport.join(svc, worker)
    # Two more: one takes the slot (sent, never run), the other waits behind it.
    running = svc.submit(alice, Submission(prompt=PROMPT, max_tokens=8))["job_id"]
    queued = svc.submit(alice, Submission(prompt=PROMPT, max_tokens=8, multiplier=1.5))["job_id"]
    yield dict(svc=svc, alice=alice, bob=bob, a=a, b=b, running=running, queued=queued,
               http=TestClient(create_app(lambda: svc)), r=r, transport=transport)
    r.delete(DASHBOARD_SEEN)


def signed_in(http: TestClient, key: str) -> dict[str, Any]:
    reply = http.post("/dashboard/session", json={"key": key})
    assert reply.status_code == 200, reply.text
    return reply.json()


def test_the_page_and_its_assets_are_served_from_the_package(market: dict[str, Any]) -> None:
    http = market["http"]
    page = http.get("/dashboard")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    for src in ("/static/chartjs/chart.umd.min.js", "/static/dashboard/dashboard.js", "/static/dashboard/dashboard.css"):
        assert src in page.text
        assert http.get(src).status_code == 200, src
    assert "https://" not in page.text  # nothing from a CDN


def test_a_bad_key_is_refused_in_the_api_error_shape_and_sets_no_cookie(market: dict[str, Any]) -> None:
    http = market["http"]
    reply = http.post("/dashboard/session", json={"key": "llm_not-a-key"})
    assert reply.status_code == 401
    assert reply.json()["error"]["code"] == "UnknownAccount"
    assert COOKIE not in reply.cookies
    assert http.get("/dashboard/snapshot").status_code == 401
    assert http.get("/dashboard/events").status_code == 401
    empty = http.post("/dashboard/session", json={})
    assert empty.status_code == 422 and "key" in empty.json()["error"]["message"]


def test_the_admin_sees_the_market_the_herd_the_money_and_every_job_but_no_text(market: dict[str, Any]) -> None:
    http, svc = market["http"], market["svc"]
    assert signed_in(http, ADMIN_KEY) == {"role": "admin"}
    snap = http.get("/dashboard/snapshot").json()
    assert snap["role"] == "admin"

    models = {m["model"]: m for m in snap["market"]["models"]}
    assert models["smollm2"] == {"model": "smollm2", "queued": 1, "running": 1, "slots": 1}
    assert snap["market"]["bids"] == [{"multiplier": 1.5, "jobs": 1}]
    discovery = {row["multiplier"]: row["position"] for row in snap["prices"]["discovery"]}
    assert discovery == {1.0: 2, 1.5: 2, 2.0: 1, 5.0: 1}  # a new bid of 1.5 waits behind the queued 1.5
    # The bid of the job admitted last (the queued 1.5), as /info reports it: one definition for both.
    assert snap["prices"]["last_multiplier"] == 1.5
    assert market["http"].get("/info").json()["last_multiplier"] == 1.5

    [worker] = snap["herd"]
    assert worker["alive"] and worker["worker"] == "stub-smollm2@local" and worker["slots"] == 1

    jobs = {j["job_id"]: j for j in snap["jobs"]}
    assert set(jobs) == {market["a"], market["b"], market["running"], market["queued"]}
    assert jobs[market["a"]]["account"] == "alice" and jobs[market["b"]]["account"] == "bob"
    assert [jobs[market[k]]["state"] for k in ("running", "queued")] == ["running", "queued"]
    with svc.sessions.begin() as s:
        revenue = ledger.balance(s, ledger.account_by_name(s, "revenue"))
        held = ledger.held_for(s, market["running"]) + ledger.held_for(s, market["queued"])
    done = [jobs[market["a"]], jobs[market["b"]]]
    assert all(j["state"] == "done" and j["charged"] > 0 and j["completion_tokens"] > 0 for j in done)
    assert all(j["queue_wait_s"] is not None and j["ttft_s"] is not None for j in done)
    # What the worker delivered over the last minute: both finished jobs' completions.
    assert worker["tokens_per_s"] == round(sum(j["completion_tokens"] for j in done) / dashboard.SPEED_WINDOW_S, 1)
    assert snap["money"]["charged"] == sum(j["charged"] for j in done) == revenue == snap["money"]["revenue"]
    assert snap["money"]["escrow"] == held == jobs[market["running"]]["offered"] + jobs[market["queued"]]["offered"]
    assert snap["money"]["refunded"] == sum(j["refunded"] for j in done)
    assert snap["money"]["per_model"] == [{"model": "smollm2", "jobs": 2, "charged": revenue,
                                           "refunded": snap["money"]["refunded"]}]
    assert sum(p["charged"] for p in snap["money"]["history"]) == revenue
    assert snap["money"]["books"]["balanced"] is True

    text = json.dumps(snap)
    assert PROMPT not in text and SCRIPTED_TEXT not in text and "alice-ref" not in text


def test_the_admin_sees_each_worker_s_model_state_and_placement_s_decisions(market: dict[str, Any]) -> None:
    http, r = market["http"], market["r"]
    r.delete(PLACEMENT_DECISIONS)
    move = placement.Move("stub-smollm2@local", None, "smollm2", "stub-smollm2@local is idle; smollm2 waits")
    placement_store.record(r, move, "nonce-1", 1_700_000_000.0)
    placement_store.note_waiting(r, {"twin": "twin has 2 job(s) queued; no worker moves to it: w2 cannot load it"})
    try:
        signed_in(http, ADMIN_KEY)
        snap = http.get("/dashboard/snapshot").json()
    finally:
        r.delete(PLACEMENT_DECISIONS, PLACEMENT_PENDING, PLACEMENT_WAITING)
    [worker] = snap["herd"]
    assert worker["state"] == "serving" and worker["moving_to"] is None
    assert snap["placement"]["mode"] == "off"
    assert snap["placement"]["waiting"] == [
        {"model": "twin", "reason": "twin has 2 job(s) queued; no worker moves to it: w2 cannot load it"}]
    assert snap["placement"]["decisions"] == [{"at": 1_700_000_000.0, "worker": "stub-smollm2@local", "from": None,
                                               "to": "smollm2", "reason": move.reason}]


def test_a_draining_or_loading_worker_shows_the_model_it_moves_to() -> None:
    init = {"nonce": "n", "model": "twin", "outcome": "accepted", "reason": "", "at": 1.0}
    assert dashboard.moving_to({"model": "smollm2", "state": "loading", "init": init}) == "twin"
    assert dashboard.moving_to({"model": "smollm2", "state": "serving", "init": init}) is None
    assert dashboard.model_state({"model": None}) == "idle"


def test_a_requester_sees_their_balance_their_jobs_and_prices_only(market: dict[str, Any]) -> None:
    http = market["http"]
    assert signed_in(http, market["bob"]) == {"role": "requester", "account": "bob"}
    snap = http.get("/dashboard/snapshot").json()
    assert set(snap) == {"role", "now", "account", "balance", "prices", "jobs"}
    assert snap["account"] == "bob" and [j["job_id"] for j in snap["jobs"]] == [market["b"]]
    with market["svc"].sessions.begin() as s:
        assert snap["balance"] == ledger.balance(s, ledger.account_by_key(s, market["bob"]))
    text = json.dumps(snap)
    assert market["a"] not in text and market["queued"] not in text and "alice" not in text
    assert "herd" not in snap and "money" not in snap

    # Another account's key switches the view to that account alone.
    signed_in(http, market["alice"])
    mine = {j["job_id"] for j in http.get("/dashboard/snapshot").json()["jobs"]}
    assert mine == {market["a"], market["running"], market["queued"]}


def test_the_cookie_holds_a_session_not_the_key_out_of_scripts_reach_and_a_rotated_key_ends_it(
        market: dict[str, Any]) -> None:
    http, svc = market["http"], market["svc"]
    reply = http.post("/dashboard/session", json={"key": market["bob"]})
    cookie = reply.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie and "path=/dashboard" in cookie
    assert market["bob"].lower() not in cookie
    assert http.get("/dashboard/snapshot").status_code == 200
    with svc.sessions.begin() as s:
        ledger.rotate_key(s, ledger.account_by_key(s, market["bob"]))
    assert http.get("/dashboard/snapshot").status_code == 401

    assert http.delete("/dashboard/session").status_code == 204
    assert COOKIE not in http.cookies


def test_the_stream_sends_snapshots_as_server_sent_events(market: dict[str, Any]) -> None:
    http = market["http"]
    signed_in(http, ADMIN_KEY)
    with http.stream("GET", "/dashboard/events") as events:
        assert events.headers["content-type"].startswith("text/event-stream")
        lines = events.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        second = next(line for line in lines if line.startswith("data: "))
    one, two = json.loads(first[6:]), json.loads(second[6:])
    assert one["role"] == two["role"] == "admin" and two["now"] > one["now"]


def test_the_stream_signs_a_rotated_key_out(market: dict[str, Any]) -> None:
    http, svc = market["http"], market["svc"]
    signed_in(http, market["bob"])
    with http.stream("GET", "/dashboard/events") as events:
        lines = events.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert json.loads(first[6:])["account"] == "bob"
        with svc.sessions.begin() as s:
            ledger.rotate_key(s, ledger.account_by_name(s, "bob"))
        # The next snapshot finds the key gone: the page is told to sign in again, and the stream ends.
        rest = list(lines)
    assert [line for line in rest if line.startswith("event: ")] == ["event: signed-out"]
    assert not any(line.startswith("data: {\"") for line in rest)


def test_a_worker_whose_heartbeat_stops_is_remembered_as_dead(redis_url: str) -> None:
    r = redis_lib.Redis.from_url(redis_url)
    r.delete(DASHBOARD_SEEN)
    memory = dashboard.HerdMemory(r, forget_after_s=60)
    doc = {"worker": "llama@a", "model": "smollm2", "slots": 4, "busy": 2, "gpus": [0]}
    t0 = time.time()
    assert memory.observe([doc], t0) == [{"worker": "llama@a", "model": "smollm2", "state": "serving",
                                          "since": None, "moving_to": None, "gpus": [0], "slots": 4,
                                          "busy": 2, "operator": None, "operator_claimed": None, "alive": True,
                                          "last_seen_s_ago": 0.0}]
    # Another gateway process (a fresh memory on the same Redis) knows it too once it is gone.
    [dead] = dashboard.HerdMemory(r, forget_after_s=60).observe([], t0 + 10)
    assert dead["alive"] is False and dead["busy"] == 0 and dead["last_seen_s_ago"] == 10.0
    assert memory.observe([], t0 + 61) == []  # forgotten after forget_after_s
    assert r.hlen(DASHBOARD_SEEN) == 0


def test_docs_are_served_without_a_cdn(market: dict[str, Any]) -> None:
    http = market["http"]
    page = http.get("/docs")
    assert page.status_code == 200
    assert "/static/swagger-ui/swagger-ui-bundle.js" in page.text and "cdn" not in page.text.lower()
    assert http.get("/static/swagger-ui/swagger-ui-bundle.js").status_code == 200
    assert http.get("/redoc").status_code == 404  # ReDoc would load from a CDN: not offered
    assert http.get("/openapi.json").json()["openapi"].startswith("3.1")


def test_a_worker_is_shown_as_its_operators_only_when_its_heartbeat_proves_it(market: dict[str, Any]) -> None:
    svc = market["svc"]
    signer, impostor = stub.operator_signer("gpu-farm"), stub.operator_signer("gpu-farm")
    with svc.sessions.begin() as s:
        operators.register(s, "gpu-farm", signer.key.public_key())
        keys = operators.public_keys(s)
    now = time.time()
    beat = {"worker": "gpu-farm/llama@farm", "model": "smollm2", "slots": 2, "pid": 7, "ts": now, "interval_s": 2.0}
    assert dashboard.attributed(signer.attest_heartbeat(beat), keys, now)["operator"] == "gpu-farm"
    forged = dashboard.attributed(impostor.attest_heartbeat(beat), keys, now)
    assert forged["operator"] is None and forged["operator_claimed"] == "gpu-farm"
    stale = dashboard.attributed(signer.attest_heartbeat(beat), keys, now + 60)
    assert stale["operator"] is None


def test_the_admin_sees_each_operators_earnings(market: dict[str, Any]) -> None:
    svc, http = market["svc"], market["http"]
    signer = stub.operator_signer("gpu-farm")
    with svc.sessions.begin() as s:
        operators.register(s, "gpu-farm", signer.key.public_key())
    worker = stub.scripted_worker(svc.public_key, svc.counter.models(), SCRIPTED_TEXT, operator=signer)
    market["transport"].join(svc, worker)  # the running and the queued job, both on the operator's worker
    signed_in(http, ADMIN_KEY)
    snap = http.get("/dashboard/snapshot").json()
    [farm] = snap["operators"]
    with svc.sessions.begin() as s:
        expected = operators.earnings(s, "gpu-farm")
    assert farm["operator"] == "gpu-farm" and farm["jobs"] == 2
    assert farm["earned"] == expected["earned"] > 0 and farm["balance"] == expected["balance"]
    # The house kept the rest of what was charged.
    charged = sum(j["charged"] for j in snap["jobs"])
    assert snap["money"]["charged"] == charged == snap["money"]["revenue"] + farm["earned"]


def test_a_jobs_time_to_first_token_counts_every_wait_as_the_metrics_histogram_does() -> None:
    from router.core import metrics
    from router.core.models import JobRow

    timings = {"queue_wait_s": 0.5, "engine_queue_s": 0.25, "prompt_s": 0.125, "generation_s": 2.0}
    row = JobRow(id="j1", model="smollm2", state="done", created_at=10.0, dispatched_at=11.0, finished_at=14.0,
                 bid_ppm=1_000_000, timings=json.dumps(timings))
    # The herder's queue (1 s), the worker's, the wait for an engine slot, then the prompt.
    assert dashboard.job_line(row)["ttft_s"] == 1.875 == metrics.time_to_first_token(1.0, timings)


def test_admin_tabs_share_one_snapshot_a_period_and_a_key_is_still_checked_each_time(
        market: dict[str, Any]) -> None:
    from router.gateway import dashboard as gateway_dashboard
    from router.gateway import sessions

    http, svc = market["http"], market["svc"]
    app = http.app
    with svc.sessions.begin() as s:
        admin, _ = sessions.identify(s, svc, ADMIN_KEY)
    first = gateway_dashboard.snapshot(app, svc, admin)
    assert gateway_dashboard.snapshot(app, svc, admin)["now"] == first["now"]  # built once for both
    with pytest.raises(UnknownAccount):
        # The cache never stands in for the admin key: a session of an earlier admin key sees nothing.
        gateway_dashboard.snapshot(app, svc, sessions.ADMIN + "0" * 64)
    gateway_dashboard._parts(app, svc).admin_at -= dashboard.DEFAULT_PERIOD_S  # the period has passed
    assert gateway_dashboard.snapshot(app, svc, admin)["now"] > first["now"]
