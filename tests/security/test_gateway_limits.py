"""Attacks on the gateway's limits, made as an attacker would, each followed by an audit of the ledger.

In process: the real gateway app, herder core and ledger (SQLite and
PostgreSQL), a ghost worker heartbeat so admission dispatches into the stub
transport. Where the attack is about what the gateway reads, the app is
driven at the ASGI level with a body that counts what was taken from it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from llama_tasks import registry, signing
from llama_tasks.constants import HERD_PREFIX
from router.core import ledger
from router.core.db import upgrade
from router.core.errors import InvalidOffer, NumberOutOfRange
from router.core.keys import DASHBOARD_SESSION_PREFIX
from router.core.models import JobRow
from router.core.request import Submission
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.gateway.app import create_app
from router.gateway.dashboard import COOKIE
from router.herder import stub
from tests.processes import ROOT, wait_for
from tests.router.conftest import ledger_url, postgres_url  # noqa: F401  (fixtures: SQLite and PostgreSQL)
from tests.stack import free_port

DEPOSIT = 100_000
ADMIN_KEY = "the-admin-key-of-this-test"
#: A small body limit, so an attack a hundred times past it is quick to make.
BODY_LIMIT = 64 * 1024
STREAMS = 3
#: What the attacker offers: 200 MB, as in the report.
ATTACK_BYTES = 200 * 1024 * 1024
CHUNK = 64 * 1024
#: The worker's name as its heartbeat gives it: a host name only the admin may read.
WORKER = "llama@gpu-box-7.internal"
WORKER_PID = 48151


class Gateway:
    """The app, a funded account, and an audit of the books."""

    def __init__(self, svc: HerderService, key: str) -> None:
        self.svc, self.key = svc, key
        self.app = create_app(lambda: svc)
        self.http = TestClient(self.app, raise_server_exceptions=False)

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or self.key}"}

    def jobs(self) -> int:
        with self.svc.sessions.begin() as s:
            return int(s.scalar(select(func.count()).select_from(JobRow)) or 0)

    def audit(self, jobs: int = 0) -> None:
        """The books balance, and nothing was charged: the deposit is whole once every job has ended."""
        with self.svc.sessions.begin() as s:
            assert ledger.check(s) == []
            assert ledger.balance(s, ledger.account_by_key(s, self.key)) == DEPOSIT
            assert s.scalar(select(func.count()).select_from(JobRow)) == jobs


@pytest.fixture
def gw(r: Any, tmp_path: Path, redis_url: str, ledger_url: str) -> Iterator[Gateway]:  # noqa: F811
    signing.generate_keypair(tmp_path)
    settings = HerderSettings(home=tmp_path, redis_url=redis_url, database_url=ledger_url, admin_key=ADMIN_KEY,
                              max_body_bytes=BODY_LIMIT, max_streams_per_key=STREAMS)
    registry.add_model(settings.models_file, "ghost", Path(registry.smollm2_path()))
    herd = stub.StaticHerd(["ghost"], 64)
    herd.workers[0].update(worker=WORKER, pid=WORKER_PID)
    svc = stub.build(settings, transport=stub.StubTransport(), herd=herd)
    with svc.sessions.begin() as s:
        _, key = ledger.create_account(s, "attacker", DEPOSIT)
    r.set(HERD_PREFIX + WORKER, json.dumps({"worker": WORKER, "model": "ghost", "slots": 64, "pid": WORKER_PID}), ex=60)
    gateway = Gateway(svc, key)
    try:
        # One event loop for all the client's requests, as a server has: its async Redis client lives there.
        with gateway.http:
            yield gateway
    finally:
        r.delete(HERD_PREFIX + WORKER)


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": "ghost", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **fields}


def refused(reply: Any, status: int, code: str | None = None) -> dict[str, Any]:
    """The reply is ``status`` in the API's error shape; returns its error."""
    assert reply.status_code == status, reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert isinstance(error["message"], str) and error["type"]
    if code is not None:
        assert error["code"] == code, error
    return error


# --- what the gateway reads --------------------------------------------------------


class Body:
    """An attacker's body, handed to the app in chunks as it asks; counts what it took."""

    def __init__(self, total: int) -> None:
        self.total, self.taken = total, 0

    async def receive(self) -> dict[str, Any]:
        if self.taken >= self.total:
            await anyio.sleep_forever()  # a client that sent everything and waits
        chunk = min(CHUNK, self.total - self.taken)
        self.taken += chunk
        return {"type": "http.request", "body": b" " * chunk, "more_body": self.taken < self.total}


def call(app: Any, body: Body, headers: dict[str, str], path: str = "/v1/chat/completions") -> tuple[int, bytes]:
    """POST ``body`` to ``app`` straight through ASGI, as a server would hand it over."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8000),
             "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]}
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def run() -> None:
        with anyio.fail_after(30):
            await app(scope, body.receive, send)

    anyio.run(run)
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")


def test_a_200_mb_body_declared_in_content_length_is_refused_unread(gw: Gateway) -> None:
    body = Body(ATTACK_BYTES)
    for headers in ({"content-length": str(ATTACK_BYTES)}, {"content-length": str(ATTACK_BYTES), **gw.auth()}):
        status, raw = call(gw.app, body, {"content-type": "application/json", **headers})
        assert status == 413 and json.loads(raw)["error"]["code"] == "BodyTooLarge"
    assert body.taken == 0
    gw.audit()


def test_a_200_mb_chunked_body_with_a_key_is_cut_off_at_the_limit(gw: Gateway) -> None:
    body = Body(ATTACK_BYTES)
    status, raw = call(gw.app, body, {"content-type": "application/json", **gw.auth()})
    assert status == 413 and json.loads(raw)["error"]["code"] == "BodyTooLarge"
    assert body.taken <= BODY_LIMIT + CHUNK
    gw.audit()


@pytest.mark.parametrize("key", [None, "llm_not-a-key-of-anyone"])
def test_a_200_mb_body_without_a_good_key_is_refused_before_a_byte_is_read(gw: Gateway, key: str | None) -> None:
    body = Body(ATTACK_BYTES)
    headers = {"content-type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/responses"):
        status, raw = call(gw.app, body, headers, path)
        assert status == 401 and json.loads(raw)["error"]["code"] == "UnknownAccount"
    assert body.taken == 0
    gw.audit()


def test_a_body_over_the_limit_is_413_through_http_too(gw: Gateway) -> None:
    big = json.dumps(chat(messages=[{"role": "user", "content": "x" * BODY_LIMIT}])).encode()
    refused(gw.http.post("/v1/chat/completions", content=big, headers=gw.auth()), 413, "BodyTooLarge")

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted as it is read
        for start in range(0, len(big), 4096):
            yield big[start:start + 4096]

    refused(gw.http.post("/v1/chat/completions", content=chunked(), headers=gw.auth()), 413, "BodyTooLarge")
    refused(gw.http.post("/dashboard/session", content=chunked()), 413, "BodyTooLarge")
    gw.audit()


@pytest.mark.parametrize("raw", [
    b"[" * 20_000 + b"]" * 20_000,  # past Python's recursion limit: a RecursionError before
    b'{"model": "ghost", "messages": ' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"}",
    b'{"model": "ghost", "messages": [' * 1500,  # never closed
])
def test_deep_nesting_is_refused_before_parsing(gw: Gateway, raw: bytes) -> None:
    error = refused(gw.http.post("/v1/chat/completions", content=raw, headers=gw.auth()), 400, "BodyTooComplex")
    assert "nesting depth" in error["message"]
    gw.audit()


def test_a_string_longer_than_the_limit_is_refused_before_parsing(gw: Gateway) -> None:
    gw.svc.settings = gw.svc.settings.model_copy(update={"max_json_string_bytes": 1000})
    long = json.dumps(chat(stop=["y" * 1001])).encode()
    error = refused(gw.http.post("/v1/chat/completions", content=long, headers=gw.auth()), 400, "BodyTooComplex")
    assert "longest string" in error["message"]
    # Brackets inside strings do not count as nesting: this body passes the scan, and is
    # refused further on for its max_tokens alone.
    fine = chat(messages=[{"role": "user", "content": "[{" * 400}], max_tokens=True)
    refused(gw.http.post("/v1/chat/completions", json=fine, headers=gw.auth()), 422, "InvalidMaxTokens")
    gw.audit()


# --- numbers that fit no field -----------------------------------------------------


FIVE_THOUSAND_DIGITS = "9" * 5000


@pytest.mark.parametrize("path,raw", [
    ("/v1/chat/completions", '{"model": "ghost", "messages": [{"role": "user", "content": "hi"}], "max_tokens": %s}'),
    ("/v1/chat/completions", '{"model": "ghost", "messages": [{"role": "user", "content": "hi"}], "seed": -%s}'),
    ("/v1/chat/completions", '{"model": "ghost", "messages": [{"role": "user", "content": "hi"}], "fee": %s}'),
    ("/v1/chat/completions", '{"model": "ghost", "messages": [{"role": "user", "content": "hi"}], '
                             '"json_schema": {"type": "string", "maxLength": %s}}'),
    ("/v1/completions", '{"model": "ghost", "prompt": "hi", "multiplier": %s}'),
])
def test_a_5000_digit_integer_is_422(gw: Gateway, path: str, raw: str) -> None:
    body = (raw % FIVE_THOUSAND_DIGITS).encode()
    refused(gw.http.post(path, content=body, headers=gw.auth()), 422, "NumberOutOfRange")
    refused(gw.http.post(path, content=body), 401, "UnknownAccount")  # without a key: refused unread
    gw.audit()


@pytest.mark.parametrize("where,value", [
    ("body", '"1e999999999"'),
    ("body", "1e999999999"),
    ("body", '"' + FIVE_THOUSAND_DIGITS + '"'),
    ("body", "1e308"),
    ("header", "1e999999999"),
    ("header", "9" * 5000),
    ("header", "Infinity"),
    ("header", "NaN"),
])
@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_a_multiplier_no_amount_can_hold_is_422(gw: Gateway, where: str, value: str, path: str) -> None:
    base = chat() if path == "/v1/chat/completions" else {"model": "ghost", "prompt": "hi", "max_tokens": 4}
    raw = json.dumps(base)
    headers = {**gw.auth(), "content-type": "application/json"}
    if where == "body":
        raw = raw[:-1] + f', "multiplier": {value}}}'
    else:
        headers["X-Llamas-Multiplier"] = value
    error = refused(gw.http.post(path, content=raw.encode(), headers=headers), 422)
    assert error["code"] in ("InvalidOffer", "NumberOutOfRange")
    gw.audit()


@pytest.mark.parametrize("field", ["multiplier", "fee", "max_tokens", "seed", "n"])
@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400"])
def test_nan_infinity_and_overflowing_floats_are_422(gw: Gateway, field: str, constant: str) -> None:
    raw = json.dumps(chat()).rstrip("}") + f', "{field}": {constant}}}'
    refused(gw.http.post("/v1/chat/completions", content=raw.encode(), headers=gw.auth()), 422)
    gw.audit()


@pytest.mark.parametrize("fields,error", [
    ({"multiplier": "1e999999999"}, InvalidOffer),
    ({"multiplier": 10**5000}, NumberOutOfRange),
    ({"fee": 10**5000}, NumberOutOfRange),
    ({"max_tokens": 10**5000}, NumberOutOfRange),
    ({"reference": 10**5000}, NumberOutOfRange),
    ({"json_schema": {"type": "number", "maximum": float("inf")}}, NumberOutOfRange),
])
def test_the_native_api_refuses_the_same_numbers_with_typed_errors(gw: Gateway, fields: dict, error: type) -> None:
    # What the herder's ``router.submit`` task does with a request from the Python client.
    sub = Submission.from_dict({"prompt": "hi", "max_tokens": 4, "model": "ghost", **fields})
    with pytest.raises(error) as caught:
        gw.svc.submit(gw.key, sub)
    assert len(str(caught.value)) < 300  # the error can be written out, logged and sent back
    gw.audit()


# --- event streams per key -----------------------------------------------------


def test_a_keys_completion_streams_are_capped_and_a_closed_one_frees_its_slot(gw: Gateway) -> None:
    body = chat(stream=True)
    with contextlib.ExitStack() as held:
        streams = [held.enter_context(gw.http.stream("POST", "/v1/chat/completions", json=body, headers=gw.auth()))
                   for _ in range(STREAMS)]
        assert all(s.status_code == 200 for s in streams)
        assert gw.jobs() == STREAMS
        refused(gw.http.post("/v1/chat/completions", json=body, headers=gw.auth()), 429, "TooManyStreams")
        assert gw.jobs() == STREAMS  # refused before admission: nothing held for it
    # Every client went away: their slots are free again.
    with gw.http.stream("POST", "/v1/chat/completions", json=body, headers=gw.auth()) as again:
        assert again.status_code == 200
    with gw.svc.sessions.begin() as s:
        assert ledger.check(s) == []


def test_a_keys_streams_are_capped_over_every_gateway(gw: Gateway) -> None:
    # A second gateway process (its own app, its own event loop) on the same ledger and Redis.
    other = TestClient(create_app(lambda: gw.svc), raise_server_exceptions=False)
    body = chat(stream=True)
    with other, contextlib.ExitStack() as held:
        for i in range(STREAMS):
            client = gw.http if i % 2 else other
            opened = held.enter_context(client.stream("POST", "/v1/chat/completions", json=body, headers=gw.auth()))
            assert opened.status_code == 200
        for client in (gw.http, other):
            refused(client.post("/v1/chat/completions", json=body, headers=gw.auth()), 429, "TooManyStreams")
        assert gw.jobs() == STREAMS
    with gw.http.stream("POST", "/v1/chat/completions", json=body, headers=gw.auth()) as again:
        assert again.status_code == 200
    with gw.svc.sessions.begin() as s:
        assert ledger.check(s) == []


def test_a_keys_dashboard_tabs_are_capped(gw: Gateway) -> None:
    assert gw.http.post("/dashboard/session", json={"key": gw.key}).status_code == 200
    with contextlib.ExitStack() as held:
        tabs = [held.enter_context(gw.http.stream("GET", "/dashboard/events")) for _ in range(STREAMS)]
        assert all(t.status_code == 200 for t in tabs)
        refused(gw.http.get("/dashboard/events"), 429, "TooManyStreams")
    with gw.http.stream("GET", "/dashboard/events") as again:
        assert again.status_code == 200
    gw.audit()


# --- what is shown, and to whom ------------------------------------------------------


def test_anonymous_info_shows_no_host_names_and_no_pid(gw: Gateway) -> None:
    anonymous = gw.http.get("/info")
    assert anonymous.status_code == 200
    doc = anonymous.json()
    assert WORKER not in anonymous.text and "gpu-box" not in anonymous.text
    assert "pid" not in doc and str(WORKER_PID) not in anonymous.text
    assert doc["workers"] >= 1 and doc["herd"][0]["slots"] == 64
    assert {"base_fee", "fee_per_token", "fee_per_cached_token", "queue_length", "price_discovery",
            "models"} <= set(doc)  # what a requester needs to price a request and pick a bid
    for key in (gw.key, "nonsense"):
        assert WORKER not in gw.http.get("/info", headers=gw.auth(key)).text
    admin = gw.http.get("/info", headers=gw.auth(ADMIN_KEY)).json()
    assert WORKER in {w["worker"] for w in admin["herd"]} and isinstance(admin["pid"], int)
    gw.audit()


def test_the_dashboard_cookie_holds_no_key_and_signing_out_ends_the_session(gw: Gateway, r: Any) -> None:
    for key in (gw.key, ADMIN_KEY):
        http = TestClient(gw.app)
        reply = http.post("/dashboard/session", json={"key": key})
        assert reply.status_code == 200
        cookie = reply.headers["set-cookie"]
        token = http.cookies[COOKIE]
        assert key not in cookie and hashlib.sha256(key.encode()).hexdigest() not in cookie
        assert f"Max-Age={gw.svc.settings.dashboard_session_s}" in cookie
        stored = DASHBOARD_SESSION_PREFIX + hashlib.sha256(token.encode()).hexdigest()
        assert 0 < r.ttl(stored) <= gw.svc.settings.dashboard_session_s  # it expires
        assert key.encode() not in r.get(stored)
        assert http.get("/dashboard/snapshot").status_code == 200
        # Signing out ends the session on the server: the cookie, replayed, opens nothing.
        assert http.delete("/dashboard/session").status_code == 204
        assert r.get(stored) is None
        replay = TestClient(gw.app, cookies={COOKIE: token})
        refused(replay.get("/dashboard/snapshot"), 401, "UnknownAccount")
        # An expired session is the same as none.
        http.post("/dashboard/session", json={"key": key})
        r.delete(DASHBOARD_SESSION_PREFIX + hashlib.sha256(http.cookies[COOKIE].encode()).hexdigest())
        refused(http.get("/dashboard/snapshot"), 401, "UnknownAccount")
    forged = TestClient(gw.app, cookies={COOKIE: gw.key})  # the old cookie's content: a key is no session
    refused(forged.get("/dashboard/snapshot"), 401, "UnknownAccount")
    gw.audit()


@pytest.mark.parametrize("path", ["/dashboard", "/docs"])
def test_pages_carry_security_headers_and_run_no_inline_script(gw: Gateway, path: str) -> None:
    page = gw.http.get(path)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-eval" not in csp
    assert "'unsafe-inline'" not in csp.split("script-src")[1].split(";")[0]
    assert page.headers["x-frame-options"] == "DENY"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["referrer-policy"] == "no-referrer"
    # The policy allows only the gateway's own script files: the page must need nothing else.
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page.text, re.DOTALL)
    assert scripts and all('src="/static/' in attrs and not body.strip() for attrs, body in scripts)
    for src in re.findall(r'src="([^"]+)"', page.text):
        assert gw.http.get(src).status_code == 200, src
    gw.audit()


def test_error_answers_carry_the_headers_too(gw: Gateway) -> None:
    reply = gw.http.post("/v1/chat/completions", json=chat())  # no key
    refused(reply, 401)
    assert reply.headers["x-content-type-options"] == "nosniff" and reply.headers["x-frame-options"] == "DENY"
    gw.audit()


def test_redis_holds_no_key_after_sign_in(gw: Gateway, r: redis.Redis) -> None:
    gw.http.post("/dashboard/session", json={"key": gw.key})
    for name in r.scan_iter(DASHBOARD_SESSION_PREFIX + "*"):
        assert gw.key.encode() not in (r.get(name) or b"")
    gw.audit()


# --- a real gateway process, its memory watched ------------------------------------------


def _rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _push_chunked(port: int, headers: str, total: int) -> tuple[int, bytes]:
    """Send a chunked body of up to ``total`` bytes until the server stops taking it; ``(sent, reply)``."""
    sent = 0
    chunk = b"%x\r\n%s\r\n" % (CHUNK, b" " * CHUNK)
    with socket.create_connection(("127.0.0.1", port)) as conn:
        conn.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     f"Content-Type: application/json\r\n{headers}\r\n".encode())
        conn.settimeout(2)  # the server has stopped reading: the socket's buffers fill, and sending blocks
        try:
            while sent < total:
                conn.sendall(chunk)
                sent += CHUNK
        except (TimeoutError, ConnectionError):
            pass
        conn.settimeout(30)
        reply = b""
        with contextlib.suppress(ConnectionError):
            while b"\r\n\r\n" not in reply and (part := conn.recv(65536)):
                reply += part
    return sent, reply


def _answers(gateway: subprocess.Popen[bytes], port: int) -> bool:
    assert gateway.poll() is None, "the gateway exited"
    try:
        return httpx.get(f"http://127.0.0.1:{port}/info", timeout=5).status_code == 200  # builds its service
    except httpx.TransportError:
        return False


@pytest.mark.slow
def test_four_200_mb_bodies_without_a_key_leave_a_real_gateways_memory_flat(tmp_path: Path, redis_url: str) -> None:
    signing.generate_keypair(tmp_path)
    signing.generate_keypair(tmp_path, "house")
    port = free_port()
    env = dict(os.environ, LLAMAS_HOME=str(tmp_path), LLAMAS_REDIS_URL=redis_url,
               LLAMAS_DATABASE_URL=f"sqlite:///{tmp_path / 'ledger.db'}")
    upgrade(env["LLAMAS_DATABASE_URL"])
    with open(tmp_path / "gateway.log", "wb") as log:
        gateway = subprocess.Popen([sys.executable, "-m", "uvicorn", "router.api:app", "--host", "127.0.0.1",
                                    "--port", str(port)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: _answers(gateway, port), what="the gateway",
                     on_timeout=lambda: (tmp_path / "gateway.log").read_text(), every_s=0.2)
            before = _rss_bytes(gateway.pid)
            with ThreadPoolExecutor(4) as pool:
                results = list(pool.map(lambda _: _push_chunked(port, "", ATTACK_BYTES), range(4)))
            after = _rss_bytes(gateway.pid)
        finally:
            gateway.terminate()
            gateway.wait(timeout=20)
    for sent, reply in results:
        assert reply.startswith(b"HTTP/1.1 401") and b"connection: close" in reply.lower(), reply[:300]
        assert sent < ATTACK_BYTES // 10  # the connection closed long before the body's end: nothing drained
    assert after - before < 50 * 1024 * 1024, (before, after)
