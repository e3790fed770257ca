"""The gateway's HTTP protocol closes a connection whose request headers come too slowly (slowloris).

A real uvicorn process, started the way ``llamas up`` starts the gateway
(``--http`` naming the protocol class), with a one-second header deadline
(``header_timeout_app.QuickHeaders``); raw sockets play the slow client.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from uvicorn.importer import import_from_string

from router.gateway.http_protocol import HTTP_PROTOCOL, HeaderTimeoutH11Protocol
from router.local.up import GATEWAY_HTTP_PROTOCOL, port_answers
from tests.processes import ROOT, wait_for
from tests.router.header_timeout_app import QuickHeaders
from tests.stack import free_port

pytestmark = pytest.mark.slow

DEADLINE_S = QuickHeaders.header_timeout_s
#: Leeway for a loaded machine; below uvicorn's 5 s keep-alive timeout, so a close within it is the deadline's.
GRACE_S = 2.0


@pytest.fixture(scope="module")
def port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    """A uvicorn serving the echo app with the short-deadline protocol; stopped after the module."""
    chosen = free_port()
    log = tmp_path_factory.mktemp("uvicorn") / "uvicorn.log"
    with open(log, "wb") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "tests.router.header_timeout_app:app", "--lifespan", "off",
             "--http", "tests.router.header_timeout_app:QuickHeaders", "--host", "127.0.0.1", "--port", str(chosen)],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
        )
    try:
        wait_for(lambda: port_answers(chosen) or server.poll() is not None, 30, "uvicorn", log.read_text)
        assert server.poll() is None, log.read_text()
        yield chosen
    finally:
        server.terminate()
        server.wait(timeout=20)


def _seconds_until_closed(sock: socket.socket, started: float) -> float:
    """Wait for the server to close ``sock`` (end of stream); seconds since ``started``."""
    sock.settimeout(DEADLINE_S + GRACE_S)
    assert sock.recv(1024) == b"", "the server answered instead of closing"
    return time.monotonic() - started


def test_the_protocol_uvicorn_is_given_is_the_gateways():
    # The same resolution uvicorn's --http does (Config.load), on the name `llamas up` passes.
    assert GATEWAY_HTTP_PROTOCOL == HTTP_PROTOCOL
    assert import_from_string(HTTP_PROTOCOL) is HeaderTimeoutH11Protocol


@pytest.mark.parametrize("sent", [b"GET /hel", b""], ids=["half-a-request-line", "nothing"])
def test_a_request_whose_headers_never_end_is_cut_off_at_the_deadline(port, sent):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        assert DEADLINE_S * 0.9 <= _seconds_until_closed(sock, started) < DEADLINE_S + GRACE_S


def test_headers_trickled_a_byte_at_a_time_are_cut_off_all_the_same(port):
    request = b"GET / HTTP/1.1\r\nHost: llamas\r\nX-Slow: " + b"a" * 200
    with socket.create_connection(("127.0.0.1", port)) as sock:
        started = time.monotonic()
        sock.settimeout(DEADLINE_S / 5)  # a byte every fifth of the deadline, unless the server closes first
        for byte in request:
            sock.sendall(bytes([byte]))
            try:
                if sock.recv(1024) == b"":
                    break
            except TimeoutError:
                continue
        else:
            pytest.fail("the server let the headers trickle in for good")
        assert DEADLINE_S * 0.9 <= time.monotonic() - started < DEADLINE_S + GRACE_S


def test_headers_in_time_are_served_however_long_the_body_takes_and_the_next_request_has_its_own_deadline(port):
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(b"POST / HTTP/1.1\r\nHost: llamas\r\nContent-Length: 2\r\n\r\n")
        # The headers are whole: the connection outlives the deadline while the body is awaited.
        sock.settimeout(DEADLINE_S * 2)
        with pytest.raises(TimeoutError):
            sock.recv(1024)
        sock.sendall(b"hi")
        sock.settimeout(GRACE_S)
        reply = b""
        while not reply.endswith(b"got hi"):
            chunk = sock.recv(1024)
            assert chunk, f"closed mid-answer: {reply!r}"
            reply += chunk
        assert reply.startswith(b"HTTP/1.1 200")
        # The next request on the kept-alive connection gets its own deadline, not the longer keep-alive timeout.
        started = time.monotonic()
        sock.sendall(b"GET / HT")
        assert DEADLINE_S * 0.9 <= _seconds_until_closed(sock, started) < DEADLINE_S + GRACE_S
