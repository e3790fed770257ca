"""Signed webhooks: how a requester's HTTP endpoint receives responses.

Each POST carries ``X-Llamas-Signature: t=<unix seconds>,v1=<hex>`` where
``v1`` is HMAC-SHA256 over ``"<t>.<body>"`` with the account's webhook secret,
and ``X-Llamas-Delivery: <job id>``. A receiver checks the signature, refuses
timestamps outside its tolerance, and refuses a delivery id it has seen.

Webhooks only reach public addresses: a host that is, or resolves to, a
loopback, link-local, private, multicast, reserved or unspecified address is
refused at admission (``check_target``) and again at delivery, where ``post``
resolves the host once, checks every address and connects to a checked one
(so a DNS answer that changes in between cannot redirect the POST inside).
Hosts the admin allows (``LLAMAS_WEBHOOK_ALLOW_HOSTS``) skip the check.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import ipaddress
import json
import socket
import ssl
import time
from collections.abc import Collection, MutableSet
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from router.core.errors import BadChannel, WebhookTargetRefused

SIGNATURE_HEADER = "X-Llamas-Signature"
DELIVERY_HEADER = "X-Llamas-Delivery"
#: Receivers should refuse signatures older (or newer) than this.
DEFAULT_TOLERANCE_S = 300
#: Ports of URLs that name none.
DEFAULT_PORTS = {"http": 80, "https": 443}
#: NAT64's well-known prefix (RFC 6052): its addresses stand for IPv4 ones.
NAT64_PREFIX = ipaddress.IPv6Network("64:ff9b::/96")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


class WebhookRejected(Exception):
    """Raised by ``verify`` when a webhook must not be trusted."""


def sign(secret: str, body: bytes, timestamp: int) -> str:
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def verify(
    secret: str,
    body: bytes,
    signature: str,
    delivery_id: str,
    seen: MutableSet[str],
    tolerance_s: int = DEFAULT_TOLERANCE_S,
    now: float | None = None,
) -> dict[str, Any]:
    """Check a received webhook and return its JSON body, or raise ``WebhookRejected``."""
    try:
        parts = dict(item.split("=", 1) for item in signature.split(","))
        timestamp = int(parts["t"])
        given = parts["v1"]
    except (ValueError, KeyError):
        raise WebhookRejected("malformed signature header") from None
    expected = sign(secret, body, timestamp).split("v1=", 1)[1]
    if not hmac.compare_digest(given, expected):
        raise WebhookRejected("signature does not match")
    if abs((time.time() if now is None else now) - timestamp) > tolerance_s:
        raise WebhookRejected("timestamp outside tolerance")
    if delivery_id in seen:
        raise WebhookRejected(f"delivery {delivery_id} was already received")
    seen.add(delivery_id)
    return json.loads(body)


@dataclass(frozen=True)
class Target:
    """Where a webhook URL points: scheme, host (lower case, no brackets or final dot), port and path."""

    scheme: str
    host: str
    port: int
    path: str


def parse_target(url: str) -> Target:
    """Split a webhook URL, or raise ``BadChannel`` when it is not an http(s) URL with a host."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:  # an unclosed "[" or a port that is not a number
        raise BadChannel("webhook is not a valid URL") from None
    # "name." is the same host as "name": one spelling for the allow list and the resolver.
    host = (parts.hostname or "").lower().rstrip(".")
    if parts.scheme not in DEFAULT_PORTS or not host:
        raise BadChannel("webhook must be an http or https URL with a host")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return Target(parts.scheme, host, port or DEFAULT_PORTS[parts.scheme], path)


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


def refusal(address: Address) -> str | None:
    """Why a webhook may not connect to ``address``, or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        # IPv6 forms that carry an IPv4 address reach that address.
        embedded = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if embedded is None and address in NAT64_PREFIX:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None and (reason := refusal(embedded)) is not None:
            return reason
    for kind, applies in (
        ("loopback", address.is_loopback),
        ("unspecified", address.is_unspecified),
        ("link-local", address.is_link_local),
        ("multicast", address.is_multicast),
        ("private", address.is_private),
        ("reserved", address.is_reserved),
    ):
        if applies:
            return f"a {kind} address"
    # Everything else that is not globally routable (shared 100.64/10, documentation ranges…).
    return None if address.is_global else "not a public address"


def _resolve(target: Target) -> list[tuple[str, Address]]:
    """Every address the host has now, as ``(text to connect to, address)``; raises ``OSError``."""
    literal = _literal(target.host)
    if literal is not None:
        return [(target.host, literal)]
    try:
        answers = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
    except UnicodeError:  # a name the IDNA codec cannot encode has no address either
        raise socket.gaierror(f"cannot resolve {target.host!r}") from None
    found: list[tuple[str, Address]] = []
    for *_, sockaddr in answers:
        text = str(sockaddr[0])
        address = ipaddress.ip_address(text.split("%", 1)[0])  # without an IPv6 zone ("%eth0")
        if all(text != seen for seen, _ in found):
            found.append((text, address))
    return found


def _is_allowed(target: Target, allowed: Collection[str]) -> bool:
    return target.host in {host.strip("[]").lower().rstrip(".") for host in allowed}


def _checked(target: Target, addresses: list[tuple[str, Address]], allowed: Collection[str]) -> None:
    if _is_allowed(target, allowed):
        return
    for _, address in addresses:
        reason = refusal(address)
        if reason is not None:
            raise WebhookTargetRefused(target.host, reason)


def check_target(url: str, allowed: Collection[str]) -> None:
    """Refuse a webhook URL whose host is, or now resolves to, an address that is not public.

    ``allowed`` holds host names or addresses (lower case, IPv6 without
    brackets) exempt from the check. Every address the host resolves to must
    be public. A name that does not resolve right now passes: it cannot be
    shown to be internal, and delivery resolves and checks it again anyway.
    Raises ``WebhookTargetRefused``, or ``BadChannel`` for a URL without an
    http(s) scheme and a host.
    """
    target = parse_target(url)
    if _is_allowed(target, allowed):
        return
    try:
        addresses = _resolve(target)
    except OSError:  # no answer now
        return
    _checked(target, addresses, allowed)


class _Deadline:
    """One webhook try's deadline: every socket operation may wait only for what is left of it."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self._at = time.monotonic() + timeout_s

    def left_s(self) -> float:
        """Seconds left; ``TimeoutError`` once none are."""
        left = self._at - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"no complete reply within {self.timeout_s:g}s")
        return left


class _Deadlined:
    """Every send and receive of a socket times out at its deadline, not after an idle spell.

    A socket timeout bounds each operation alone: a receiver that trickles
    one byte at a time, each sooner than the timeout, would hold the try for
    as long as it liked. Here each operation waits only for the time left
    (mixed into a plain and a TLS socket: each TLS read and write too).
    """

    deadline: _Deadline

    def _arm(self) -> None:
        self.settimeout(self.deadline.left_s())  # type: ignore[attr-defined]

    def sendall(self, *args: Any) -> Any:
        self._arm()
        return super().sendall(*args)  # type: ignore[misc]

    def send(self, *args: Any) -> Any:
        self._arm()
        return super().send(*args)  # type: ignore[misc]

    def recv(self, *args: Any) -> Any:
        self._arm()
        return super().recv(*args)  # type: ignore[misc]

    def recv_into(self, *args: Any) -> Any:
        self._arm()
        return super().recv_into(*args)  # type: ignore[misc]


class _DeadlineSocket(_Deadlined, socket.socket):
    """A plain socket with a deadline."""


class _DeadlineSSLSocket(_Deadlined, ssl.SSLSocket):
    """A TLS socket with a deadline."""


class _PinnedHTTPConnection(http.client.HTTPConnection):
    """An HTTP connection to a host name that connects to one address chosen beforehand, within a deadline."""

    def __init__(self, host: str, port: int, address: str, deadline: _Deadline) -> None:
        super().__init__(host, port, timeout=deadline.timeout_s)
        self._address = address
        self._deadline = deadline

    def _open(self) -> _DeadlineSocket:
        raw = socket.create_connection((self._address, self.port), self._deadline.left_s())
        sock = _DeadlineSocket(fileno=raw.detach())
        sock.deadline = self._deadline
        sock.settimeout(self._deadline.left_s())
        return sock

    def connect(self) -> None:
        self.sock = self._open()


class _PinnedHTTPSConnection(_PinnedHTTPConnection):
    """The same over TLS: SNI and the certificate check use the host name, not the address."""

    def __init__(self, host: str, port: int, address: str, deadline: _Deadline) -> None:
        super().__init__(host, port, address, deadline)
        self._tls = ssl.create_default_context()
        self._tls.sslsocket_class = _DeadlineSSLSocket

    def connect(self) -> None:
        raw = self._open()
        # The handshake as a whole waits at most what is left (``ssl`` gives it one deadline).
        raw.settimeout(self._deadline.left_s())
        tls = self._tls.wrap_socket(raw, server_hostname=self.host)
        assert isinstance(tls, _DeadlineSSLSocket)
        tls.deadline = self._deadline
        self.sock = tls


def post(url: str, secret: str, delivery_id: str, payload: dict[str, Any], timeout_s: float,
         allowed: Collection[str] = frozenset()) -> int:
    """POST one signed delivery; returns the HTTP status.

    The host is resolved once, here; unless it is in ``allowed``, every
    address must be public (``WebhookTargetRefused`` otherwise), and the POST
    goes to one of those very addresses. Redirects are not followed (a 3xx is
    a failed delivery) and no proxy is used: either could lead elsewhere.
    ``timeout_s`` bounds the try as a whole, from connecting (to every address
    tried) to the reply's status and headers, however slowly the receiver
    answers: past it, ``TimeoutError``. (Resolving the name comes before, and
    is bounded by the system's resolver.) Raises ``OSError`` when no address
    answers or the reply is not HTTP.
    """
    target = parse_target(url)
    addresses = _resolve(target)
    _checked(target, addresses, allowed)
    body = json.dumps(payload, sort_keys=True).encode()
    headers = {
        "Content-Type": "application/json",
        SIGNATURE_HEADER: sign(secret, body, int(time.time())),
        DELIVERY_HEADER: delivery_id,
        "User-Agent": "llamas-webhook/1",
    }
    pinned = _PinnedHTTPSConnection if target.scheme == "https" else _PinnedHTTPConnection
    failure: OSError = ConnectionError(f"{target.host} has no address")
    deadline = _Deadline(timeout_s)
    for text, _ in addresses:
        # The Host header comes from the name; the socket goes to ``text``.
        connection = pinned(target.host, target.port, text, deadline)
        try:
            try:
                connection.connect()
            except OSError as exc:
                failure = exc  # nothing was sent: the next address may answer
                continue
            connection.request("POST", target.path, body=body, headers=headers)
            return int(connection.getresponse().status)
        except http.client.HTTPException as exc:
            raise ConnectionError(f"{target.host} gave no valid HTTP reply: {type(exc).__name__}") from exc
        finally:
            connection.close()
    raise failure
