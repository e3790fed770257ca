"""A webhook receiver that trickles its reply cannot hold a herder process.

The attack: a requester names a webhook whose server reads the POST, then
answers one byte at a time, each sooner than a socket timeout would notice.
A try must end at its own deadline (``LLAMAS_WEBHOOK_TIMEOUT_S``, connect to
last byte), be tried again after a pause that grows, and leave the herder
free to answer everyone else between tries.
"""

from __future__ import annotations

import os
import queue
import select
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from router.client import Herder
from router.core import ledger, webhooks
from router.core.db import open_ledger
from router.core.request import Submission
from router.core.settings import HerderSettings
from router.herder import stub
from tests.processes import CeleryProcess, wait_for

#: One byte of the reply every this many seconds: far sooner than any try's deadline.
TRICKLE_EVERY_S = 0.2
#: A reply that never ends: a status line, then one header that goes on and on.
ENDLESS_REPLY = b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100_000
#: The trickler gives up on its own after this long (so a failing test ends too).
TRICKLE_FOR_S = 120.0


@dataclass
class Attempt:
    """One connection to the trickler: when it opened, when the client hung up, how many bytes it was sent."""

    opened_at: float
    closed_at: float | None = None
    sent: int = 0


@dataclass
class Trickler:
    """A real HTTP receiver on loopback that reads each POST whole, then trickles its reply."""

    server: socket.socket
    attempts: list[Attempt] = field(default_factory=list)
    #: ``("opened" | "closed", attempt number)`` as they happen.
    events: queue.Queue[tuple[str, int]] = field(default_factory=queue.Queue)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.getsockname()[1]}/hook"

    def serve(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return  # closed: the test is over
            attempt = Attempt(time.monotonic())
            self.attempts.append(attempt)
            number = len(self.attempts)
            self.events.put(("opened", number))
            threading.Thread(target=self._trickle, args=(conn, attempt, number), daemon=True).start()

    def _trickle(self, conn: socket.socket, attempt: Attempt, number: int) -> None:
        with conn:
            _read_request(conn)
            until = time.monotonic() + TRICKLE_FOR_S
            while time.monotonic() < until and attempt.sent < len(ENDLESS_REPLY):
                try:
                    conn.sendall(ENDLESS_REPLY[attempt.sent:attempt.sent + 1])
                except OSError:
                    break
                attempt.sent += 1
                readable, _, _ = select.select([conn], [], [], TRICKLE_EVERY_S)
                if readable and not conn.recv(1):
                    break  # the client hung up
            attempt.closed_at = time.monotonic()
        self.events.put(("closed", number))

    def next_event(self, timeout_s: float = 60.0) -> tuple[str, int]:
        return self.events.get(timeout=timeout_s)


def _read_request(conn: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536) or b"\r\n\r\n"
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return
        body += chunk


@pytest.fixture
def trickler() -> Iterator[Trickler]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    t = Trickler(server)
    threading.Thread(target=t.serve, daemon=True).start()
    yield t
    server.close()


def test_a_trickling_receiver_is_cut_off_at_the_deadline(trickler: Trickler) -> None:
    deadline_s = 1.0
    with pytest.raises(TimeoutError):
        webhooks.post(trickler.url, "whsec", "job-1", {"job_id": "job-1"}, deadline_s, allowed={"127.0.0.1"})
    assert trickler.next_event() == ("opened", 1) and trickler.next_event() == ("closed", 1)
    [attempt] = trickler.attempts
    assert attempt.closed_at is not None
    held_s = attempt.closed_at - attempt.opened_at
    # Each byte came sooner than any per-read timeout would fire: only a deadline ends this.
    assert attempt.sent >= 3
    assert held_s < deadline_s + 2.0, f"the try held the connection {held_s:.1f}s"


def test_a_prompt_receiver_still_gets_its_delivery_within_the_deadline() -> None:
    got: list[bytes] = []
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def answer() -> None:
        conn, _ = server.accept()
        with conn:
            _read_request(conn)
            got.append(b"POST")
            conn.sendall(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=answer, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}/hook"
    assert webhooks.post(url, "whsec", "job-2", {"job_id": "job-2"}, 5.0, allowed={"127.0.0.1"}) == 204
    thread.join(10)
    server.close()
    assert got == [b"POST"]


# --- against a real herder process ---------------------------------------------


@pytest.mark.slow
def test_the_herder_cuts_each_try_retries_after_growing_pauses_and_stays_free(
    trickler: Trickler, tmp_path: Path, redis_url: str
) -> None:
    timeout_s, backoff_s, attempts = 1.5, 3.0, 3
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    settings = HerderSettings(redis_url=redis_url, database_url=ledger_url, webhook_allow_hosts="127.0.0.1")
    # A job that ended with a webhook to the trickler, admitted and settled as the herder does it.
    svc = stub.build(settings, slots=1)
    with svc.sessions.begin() as s:
        _, key = ledger.create_account(s, "hooked", 10_000)
    job_id = svc.submit(key, Submission(prompt="Say hi.", max_tokens=4, webhook_url=trickler.url))["job_id"]
    assert isinstance(svc.transport, stub.StubTransport)
    svc.transport.join(svc, stub.scripted_worker(svc.public_key, svc.counter.models()))
    assert svc.transport.webhooks == [job_id]
    svc.sessions.kw["bind"].dispose()

    env = dict(os.environ, LLAMAS_DATABASE_URL=ledger_url, LLAMAS_WEBHOOK_TIMEOUT_S=str(timeout_s),
               LLAMAS_WEBHOOK_BACKOFF_S=str(backoff_s), LLAMAS_WEBHOOK_ATTEMPTS=str(attempts),
               LLAMAS_WEBHOOK_ALLOW_HOSTS="127.0.0.1")
    # One pool process: any try that held it would hold the whole herder.
    herder = CeleryProcess("router", "herder", "herder-hook", 1, env, tmp_path / "herder.log")
    try:
        herder.wait_log("ready.")
        from router.herder.app import app

        app.send_task("router.webhook", args=[job_id], queue="herder")
        assert trickler.next_event() == ("opened", 1) and trickler.next_event() == ("closed", 1)
        # Between tries the herder answers others at once: nothing of it waits for the next try.
        info = Herder(key, timeout_s=30).info()
        answered_at = time.monotonic()
        assert info["name"] == settings.service_name
        for number in (2, 3):
            assert trickler.next_event() == ("opened", number) and trickler.next_event() == ("closed", number)
        wait_for(lambda: "failed for good" in herder.output(), 30, "the herder to give the webhook up",
                 herder.output)
    finally:
        herder.stop()

    tries = trickler.attempts
    assert len(tries) == attempts  # no fourth try
    assert all(t.closed_at is not None and t.sent >= 3 for t in tries)
    held = [(t.closed_at or 0) - t.opened_at for t in tries]
    assert all(h < timeout_s + 2.0 for h in held), f"tries held the connection {held}s"
    pauses = [tries[i + 1].opened_at - (tries[i].closed_at or 0) for i in range(attempts - 1)]
    assert pauses[0] >= 0.9 * backoff_s and pauses[1] >= 0.9 * 2 * backoff_s, pauses
    assert answered_at < tries[1].opened_at  # answered during the first pause
    sessions, _ = open_ledger(ledger_url)
    with sessions.begin() as s:
        # A webhook moves no money: the books balance, the job's charge as it settled.
        assert ledger.check(s) == []
    sessions.kw["bind"].dispose()
