"""Webhook targets: only public addresses, checked at admission and again when the POST connects."""

from __future__ import annotations

import json
import socket
import threading
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace
from typing import Any

import pytest

from router.core import webhooks
from router.core.errors import BadChannel, WebhookTargetRefused
from router.herder import tasks

PUBLIC_V4 = "93.184.216.34"
SECRET = "whsec-test"

_real_getaddrinfo = socket.getaddrinfo


def _answer(address: str, port: Any) -> list[tuple[Any, ...]]:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sockaddr = (address, int(port or 0), 0, 0) if family == socket.AF_INET6 else (address, int(port or 0))
    return [(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)]


class FakeDNS:
    """Answers for made-up names, in order (the last answer repeats); real DNS for everything else."""

    def __init__(self, answers: dict[str, list[list[str] | None]]) -> None:
        self.answers = answers
        self.asked: Counter[str] = Counter()

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host not in self.answers:
            return _real_getaddrinfo(host, port, *args, **kwargs)
        script = self.answers[host]
        addresses = script[min(self.asked[host], len(script) - 1)]
        self.asked[host] += 1
        if addresses is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [entry for address in addresses for entry in _answer(address, port)]


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch):
    def install(**answers: list[list[str] | None]) -> FakeDNS:
        fake = FakeDNS({name.replace("_", "."): script for name, script in answers.items()})
        monkeypatch.setattr(socket, "getaddrinfo", fake)
        return fake

    return install


@pytest.mark.parametrize("url", [
    "http://127.0.0.1/hook",
    "http://127.1.2.3:8000/",
    "http://localhost:8000/hook",
    "http://LOCALHOST./hook",
    "http://[::1]/",
    "http://169.254.169.254/latest/meta-data/",
    "http://10.0.0.5/",
    "http://172.16.3.4/",
    "http://192.168.1.20:8080/x?y=1",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:169.254.169.254]/",
    "http://[64:ff9b::a9fe:a9fe]/",   # NAT64 form of 169.254.169.254
    "http://[2002:7f00:1::]/",         # 6to4 form of 127.0.0.1
    "http://[fe80::1]/",
    "http://[fd00::1]/",
    "http://0.0.0.0:6379/",
    "http://224.0.0.251/",
    "http://100.64.0.1/",
    "http://2130706433/",              # 127.0.0.1 written as one number: the resolver reads it so
])
def test_internal_targets_are_refused(url):
    with pytest.raises(WebhookTargetRefused) as info:
        webhooks.check_target(url, set())
    assert isinstance(info.value, BadChannel)  # a 422 at the gateway, nothing held
    assert info.value.host and info.value.reason


@pytest.mark.parametrize("url", [
    "https://93.184.216.34/hook",
    "http://8.8.8.8:8080/",
    "https://[2606:4700:4700::1111]/hook",
])
def test_public_addresses_pass_without_any_lookup(url, monkeypatch):
    def no_dns(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an address literal needs no DNS")

    monkeypatch.setattr(socket, "getaddrinfo", no_dns)
    webhooks.check_target(url, set())


@pytest.mark.parametrize("url,allowed", [
    ("http://127.0.0.1:9000/hook", {"127.0.0.1"}),
    ("http://localhost/hook", {"localhost"}),
    ("http://[::1]:9000/", {"[::1]"}),
    ("http://Internal.Example/", {"internal.example"}),
])
def test_a_host_the_operator_allows_passes(url, allowed):
    webhooks.check_target(url, allowed)


def test_allowing_one_host_allows_no_other():
    with pytest.raises(WebhookTargetRefused):
        webhooks.check_target("http://10.0.0.1/", {"127.0.0.1", "localhost"})


def test_a_name_with_any_internal_address_is_refused(dns):
    dns(mixed_example=[[PUBLIC_V4, "10.1.2.3"]], public_example=[[PUBLIC_V4]])
    with pytest.raises(WebhookTargetRefused):
        webhooks.check_target("https://mixed.example/hook", set())
    webhooks.check_target("https://public.example/hook", set())


def test_a_name_that_does_not_resolve_yet_is_left_to_delivery(dns):
    dns(later_example=[None])
    webhooks.check_target("https://later.example/hook", set())
    with pytest.raises(OSError):
        webhooks.post("https://later.example/hook", SECRET, "job-1", {}, 1.0)


@pytest.mark.parametrize("url", ["ftp://example.com/hook", "http:///no-host", "http://[::1/", "http://h:99999/"])
def test_a_url_that_is_not_http_with_a_host_is_a_bad_channel(url):
    with pytest.raises(BadChannel) as info:
        webhooks.check_target(url, set())
    assert not isinstance(info.value, WebhookTargetRefused)


def test_delivery_resolves_again_and_refuses_a_name_rebound_to_loopback(dns, monkeypatch):
    fake = dns(rebind_example=[[PUBLIC_V4], ["127.0.0.1"]])
    webhooks.check_target("http://rebind.example:6379/", set())  # public when admitted
    connected: list[Any] = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: connected.append(a))
    with pytest.raises(WebhookTargetRefused) as info:
        webhooks.post("http://rebind.example:6379/", SECRET, "job-1", {"text": "hi"}, 1.0)
    assert info.value.reason == "a loopback address"
    assert connected == []  # refused before any connection was opened
    assert fake.asked["rebind.example"] == 2


# --- delivery connects to the address it checked -----------------------------


class _Receiver(BaseHTTPRequestHandler):
    got: list[dict[str, Any]] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).got.append({"path": self.path, "host": self.headers["Host"], "body": body,
                               "signature": self.headers[webhooks.SIGNATURE_HEADER],
                               "delivery": self.headers[webhooks.DELIVERY_HEADER]})
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", f"http://127.0.0.1:{self.server.server_address[1]}/elsewhere")
        else:
            self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[int, list[dict[str, Any]]]]:
    _Receiver.got = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1], _Receiver.got
    server.shutdown()
    server.server_close()


def test_delivery_goes_to_the_resolved_address_with_the_names_host_header(dns, receiver):
    port, got = receiver
    # Resolved once by the delivery; a second lookup would get an address that answers nothing.
    fake = dns(hook_example=[["127.0.0.1"], ["192.0.2.1"]])
    code = webhooks.post(f"http://hook.example:{port}/in?x=1", SECRET, "job-7", {"job_id": "job-7"}, 5.0,
                         allowed={"hook.example"})
    assert code == 204
    assert fake.asked["hook.example"] == 1
    [hit] = got
    assert hit["host"] == f"hook.example:{port}" and hit["path"] == "/in?x=1"
    doc = webhooks.verify(SECRET, hit["body"], hit["signature"], hit["delivery"], set())
    assert doc == {"job_id": "job-7"}


def test_a_redirect_is_not_followed(receiver):
    port, got = receiver
    code = webhooks.post(f"http://127.0.0.1:{port}/moved", SECRET, "job-8", {}, 5.0, allowed={"127.0.0.1"})
    assert code == 302
    assert [h["path"] for h in got] == ["/moved"]


# --- the delivery task --------------------------------------------------------


def test_the_delivery_task_fails_a_refused_target_for_good_without_the_body(monkeypatch, caplog):
    completion = "the-completion-text-4711"
    stub = SimpleNamespace(
        settings=SimpleNamespace(webhook_timeout_s=1.0, webhook_attempts=5, webhook_allowed=set()),
        webhook_target=lambda job_id: ("http://169.254.169.254/latest", SECRET,
                                       {"job_id": job_id, "text": completion}),
    )
    monkeypatch.setattr(tasks, "service", lambda: stub)
    connected: list[Any] = []
    monkeypatch.setattr(socket, "create_connection", lambda *a, **k: connected.append(a))
    with caplog.at_level("INFO"):
        result = tasks.deliver_webhook.apply(args=["job-42"])
    assert result.state == "SUCCESS" and result.result == 0  # not retried, not raised
    assert connected == []
    refused = [r for r in caplog.records if r.name == "router.herder.tasks"]
    assert len(refused) == 1 and "job-42" in refused[0].getMessage() and "refused" in refused[0].getMessage()
    assert completion not in caplog.text
    assert json.dumps(completion) not in caplog.text
