"""The herder end to end: real Redis, a real ledger (SQLite and PostgreSQL),
a real herder worker with beat, and real SmolLM2 workers.

What depends on real processes lives here (Celery's messages, callbacks and
redelivery, a SIGKILLed worker, a flushed Redis, a running job stopped);
the herder's own decisions are tested in one process in ``test_life.py``.
"""

from __future__ import annotations

import http.server
import json
import os
import signal
import threading
import time
import uuid
from typing import Any

import pytest

from llama_tasks import stream
from router.core import ledger, receipts, webhooks
from tests.processes import llama_worker, wait_for
from tests.router.requester_app import RECEIVED_KEY

pytestmark = pytest.mark.slow

# Exactly 200 letters: a job long enough to hold the slot while others queue.
LONG = dict(prompt="Letters:", tokens=200, grammar="root ::= [a-z]{200}", temperature=0.0)


def test_a_paid_request_is_charged_for_actual_tokens_and_the_rest_returned(stack):
    key, herder = stack.account(10_000)
    handle = herder.run("Say hi.", 64, multiplier=2, stop=["."], temperature=0.0)
    doc = handle.result(timeout=60)
    row = stack.job(handle.id)
    assert doc["status"] == "done" and row.state == "done"
    assert doc["offered"] == 2 * row.quote
    assert doc["charged"] == 2 * (1 + 1 * (row.prompt_tokens + doc["completion_tokens"]))
    assert doc["charged"] + doc["refunded"] == doc["offered"]
    assert stack.balance(key) == 10_000 - doc["charged"]
    assert stack.books() == []


def test_a_finished_job_has_a_receipt_the_herders_public_key_verifies(stack, private_key):
    key, herder = stack.account(10_000)
    handle = herder.run("Say hi.", 8, temperature=0.0)
    doc = handle.result(timeout=60)
    payload = receipts.verify(handle.receipt(), private_key.public_key())
    assert (payload["job_id"], payload["state"], payload["worker"]) == (handle.id, "done", doc["worker"])
    assert (payload["held"], payload["charged"], payload["refunded"]) == (doc["offered"], doc["charged"],
                                                                          doc["refunded"])


def test_expiry_and_cancel_return_everything(stack):
    key, herder = stack.account(100_000)
    blocker = stack.occupy(herder)
    doomed = herder.run("Too late.", 8, deadline_s=0.2)
    cancelled = herder.run("Never mind.", 8)
    cancelled.cancel()
    assert doomed.response(timeout=30)["status"] == "expired"
    assert cancelled.response(timeout=30)["status"] == "cancelled"
    done = stack.release(blocker)
    # Stopped mid-generation: charged for the letters it made, the rest of its hold returned.
    assert done["finish_reason"] == "cancelled" and 0 < len(done["text"]) < 2000
    assert done["charged"] == 1 + done["prompt_tokens"] + done["completion_tokens"]
    assert stack.balance(key) == 100_000 - done["charged"]
    assert stack.books() == []


def test_forwarding_to_the_requesters_celery_task_carries_the_reference(stack):
    key, herder = stack.account(10_000)
    reference = f"ref-{uuid.uuid4().hex}"
    handle = herder.run("Say yes.", 4, reference=reference,
                        callback=("requester.inference_response", "requester"))
    handle.result(timeout=60)
    deadline = time.monotonic() + 30
    received: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not received:
        received = [json.loads(x) for x in stack.r.lrange(RECEIVED_KEY, 0, -1)]
        received = [x for x in received if x["reference"] == reference]
        time.sleep(0.05)
    assert len(received) == 1 and received[0]["job_id"] == handle.id and received[0]["status"] == "done"
    # Resubmitting with the same reference returns the same job and delivers nothing new.
    again = herder.run("Say yes.", 4, reference=reference, callback=("requester.inference_response", "requester"))
    assert again.id == handle.id


class _Receiver(http.server.BaseHTTPRequestHandler):
    secret = ""
    seen: set[str] = set()
    accepted: list[dict[str, Any]] = []
    rejected: list[str] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        try:
            doc = webhooks.verify(self.secret, body, self.headers[webhooks.SIGNATURE_HEADER],
                                  self.headers[webhooks.DELIVERY_HEADER], self.seen)
            self.accepted.append(doc)
            self.send_response(204)
        except webhooks.WebhookRejected as exc:
            self.rejected.append(str(exc))
            self.send_response(400)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_the_webhook_arrives_once_with_a_valid_signature(stack):
    key, herder = stack.account(10_000)
    with stack.sessions.begin() as s:
        _Receiver.secret = ledger.account_by_key(s, key).webhook_secret
    server = http.server.HTTPServer(("127.0.0.1", 0), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/hook"
        handle = herder.run("Say ok.", 4, webhook=url, reference="hook-1")
        handle.result(timeout=60)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not [d for d in _Receiver.accepted if d["job_id"] == handle.id]:
            time.sleep(0.05)
        time.sleep(1.0)  # any duplicate would arrive within this window
        mine = [d for d in _Receiver.accepted if d["job_id"] == handle.id]
        assert len(mine) == 1 and mine[0]["reference"] == "hook-1"
        assert _Receiver.rejected == []
    finally:
        server.shutdown()


def test_a_forged_result_or_one_for_an_unknown_job_changes_nothing(stack):
    from router.herder.app import app

    key, herder = stack.account(100_000)
    blocker = herder.run(**LONG)
    next(e for e in stream.follow(stack.r, blocker.id, timeout_s=30) if e["event"] == "token")
    row = stack.job(blocker.id)
    forged = {"task_id": row.task_id, "job_id": row.id, "attempt": row.attempt,
              "choices": [{"index": 0, "text": "", "finish_reason": "stop"}], "worker": "evil", "timings": {}}
    app.send_task("router.settle", args=[forged], queue="herder")
    app.send_task("router.settle", args=[forged, row.task_id], queue="herder")  # a link callback's shape
    app.send_task("router.settle", args=[forged | {"task_id": uuid.uuid4().hex, "job_id": "nope"}], queue="herder")
    app.send_task("router.settle_error", args=[uuid.uuid4().hex], queue="herder")
    done = blocker.result(timeout=120)
    assert done["worker"] != "evil" and len(done["text"]) == 200
    assert stack.captures(blocker.id) == 1
    assert stack.books() == []


def test_sigkill_of_a_batching_worker_with_jobs_in_flight_completes_each_once(stack):
    """A batching worker is one process: killed, it takes every job it was
    decoding with it. The herder sees the process gone from the herd, sends
    each job again, and each is completed, charged and delivered once."""
    key, herder = stack.account(100_000)
    doomed = llama_worker(f"doomed-{uuid.uuid4().hex[:6]}", 3, stack.env, stack.tmp / "doomed.log")
    try:
        doomed.wait_ready(stack.r)
        refs = [f"kill-{uuid.uuid4().hex}" for _ in range(4)]
        # Four slots in the herd (the stack's worker has one): all four run at once.
        handles = [herder.run(**LONG, reference=ref, callback=("requester.inference_response", "requester"))
                   for ref in refs]
        starts = {}
        for h in handles:
            starts[h.id] = next(stream.follow(stack.r, h.id, timeout_s=60))
            next(e for e in stream.follow(stack.r, h.id, timeout_s=60) if e["event"] == "token")
        on_doomed = [h for h in handles if starts[h.id]["worker"] == doomed.name]
        assert len(on_doomed) == 3
        os.kill(doomed.proc.pid, signal.SIGKILL)
        docs = [h.result(timeout=180) for h in handles]
    finally:
        doomed.stop()
    assert all(d["status"] == "done" and len(d["text"]) == 200 for d in docs)
    for h, d in zip(handles, docs):
        assert stack.captures(h.id) == 1
        assert d["attempts"] == (2 if h in on_doomed else 1)
        assert d["worker"] != doomed.name
    for h in on_doomed:
        # The dead attempt's claim is closed: its message, handed back by Redis later, is refused as a replay.
        assert json.loads(stack.r.get(f"llamas:claim:{h.id}:1"))["state"] == "done"
    received = wait_for(lambda: (got := [json.loads(x) for x in stack.r.lrange(RECEIVED_KEY, 0, -1)])
                        and {x["reference"] for x in got} >= set(refs) and got, 30, "every callback")
    assert sorted(x["reference"] for x in received if x["reference"] in refs) == sorted(refs)  # once each
    assert stack.books() == []


def test_flushall_with_jobs_queued_still_completes_them_all(stack):
    key, herder = stack.account(100_000)
    blocker = herder.run(**LONG)
    next(e for e in stream.follow(stack.r, blocker.id, timeout_s=30) if e["event"] == "token")
    queued = [herder.run(f"Count to {i}.", 6) for i in range(4)]
    stack.r.flushdb()  # the test database: everything Redis knew is gone
    stack.r.set("llamas:test-session", os.getpid(), ex=3600)  # keep our claim on it
    for h in [blocker, *queued]:
        assert h.result(timeout=120)["status"] == "done"
    assert stack.books() == []


def test_the_client_computes_fees_itself_and_bumps_its_bid_on_a_busy_queue(stack):
    key, herder = stack.account(100_000)
    assert herder.prices() == (1, 1)
    assert herder.calculate_fee(prompt_tokens=10, tokens=20) == 31
    assert herder.calculate_fee(prompt_tokens=10, tokens=20, multiplier=2) == 62
    quoted = herder.quote("Hello there", 10)
    assert quoted["quote"] == herder.calculate_fee(quoted["prompt_tokens"], 10)
    blocker = stack.occupy(herder)
    rich = herder.run("Me first.", 4, multiplier=3)
    bumped = herder.run("And me.", 4, bump=True)
    assert bumped.doc["multiplier"] == pytest.approx(3.0, abs=0.01)
    assert bumped.position() == 2  # level with the last bid, behind it by arrival
    stack.release(blocker)
    for h in (rich, bumped):
        h.result(timeout=120)
    assert stack.books() == []
