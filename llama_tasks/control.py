"""Init: the herder tells one running worker which model to serve.

An Init is an Ed25519 envelope like a job's, signed by the herder's key, whose
payload is ``{"kind": "init", "worker", "model", "model_id", "nonce",
"issued_at", "expires_at", "grace_s"}``. Whoever asks (``llamas workers
init``, the placement step of a herder) pushes it on the worker's own list,
``CONTROL_PREFIX + worker``; the worker pops it and accepts it only when the
signature verifies, it is addressed to this worker, it has not expired, it was
issued after this worker started (a copy kept from before cannot be played to
it), and its nonce is taken for the first time (``SET NX``: a replay within
its lifetime is refused). Anything else is refused as a job envelope would be.

The outcome travels back in the worker's signed heartbeat, under ``"init"``:
``{"nonce", "model", "outcome", "reason", "at"}``, where outcome is
``accepted`` (draining, then loading), ``loaded`` or ``refused``.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from typing import Any

import redis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from llama_tasks import signing
from llama_tasks.errors import InitExpired, InitReplayed, NotAnInit, NotForThisWorker

#: ``CONTROL_PREFIX + worker`` → list of signed Inits for that worker.
CONTROL_PREFIX = "llamas:control:"
#: ``SEEN_PREFIX + worker + ":" + nonce`` exists once that Init was received.
SEEN_PREFIX = "llamas:control-seen:"
KIND = "init"
#: How long an Init may wait for its worker: a worker busy loading reads it after.
INIT_TTL_S = 120.0
#: Default time a worker lets running jobs finish before handing them back.
GRACE_S = 30.0

#: Heartbeat states: what a worker is doing with its model.
IDLE, LOADING, SERVING, DRAINING = "idle", "loading", "serving", "draining"
STATES = (IDLE, LOADING, SERVING, DRAINING)
#: Outcomes of an Init as the heartbeat reports them.
ACCEPTED, LOADED, REFUSED = "accepted", "loaded", "refused"


@dataclass(frozen=True)
class Init:
    """One signed instruction: ``worker`` is to serve ``model`` (whose sha256 is ``model_id``)."""

    worker: str
    model: str
    model_id: str
    nonce: str
    issued_at: float
    expires_at: float
    grace_s: float = GRACE_S

    def to_payload(self) -> dict[str, Any]:
        return {"kind": KIND, **asdict(self)}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Init:
        if payload.get("kind") != KIND:
            raise NotAnInit(f"kind is {payload.get('kind')!r}")
        body = {k: v for k, v in payload.items() if k != "kind"}
        try:
            init = cls(**body)
        except TypeError as exc:  # a field missing or one too many
            raise NotAnInit(str(exc)) from None
        for name in ("worker", "model", "model_id", "nonce"):
            value = getattr(init, name)
            if not isinstance(value, str) or not 0 < len(value) <= 256:
                raise NotAnInit(f"{name} must be a short string")
        for name in ("issued_at", "expires_at", "grace_s"):
            value = getattr(init, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                raise NotAnInit(f"{name} must be a non-negative number")
        return init


def build(worker: str, model: str, model_id: str, key: Ed25519PrivateKey, now: float,
          grace_s: float = GRACE_S, ttl_s: float = INIT_TTL_S) -> dict[str, Any]:
    """A signed Init for ``worker``, valid for ``ttl_s``."""
    init = Init(worker=worker, model=model, model_id=model_id, nonce=secrets.token_hex(16),
                issued_at=now, expires_at=now + ttl_s, grace_s=grace_s)
    return signing.sign(init.to_payload(), key)


def send(r: redis.Redis, envelope: dict[str, Any]) -> str:
    """Push a signed Init on its worker's list; returns its nonce."""
    payload = envelope["payload"]
    key = CONTROL_PREFIX + payload["worker"]
    pipe = r.pipeline()
    pipe.rpush(key, json.dumps(envelope))
    # A list nobody pops (its worker is gone) does not outlive what it holds.
    pipe.expire(key, int(INIT_TTL_S) + 60)
    pipe.execute()
    return str(payload["nonce"])


def receive(r: redis.Redis, worker: str, timeout_s: float) -> Any | None:
    """The next message on ``worker``'s list (decoded JSON, or the raw text), or None after ``timeout_s``."""
    popped = r.blpop([CONTROL_PREFIX + worker], timeout=timeout_s)
    if popped is None:
        return None
    raw = popped[1]
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw


def accept(r: redis.Redis, envelope: Any, public_key: Ed25519PublicKey, worker: str, now: float,
           started_at: float) -> Init:
    """Verify an Init for ``worker`` and take its nonce; raises a ``Rejected`` error otherwise."""
    init = Init.from_payload(signing.verify(envelope, public_key))
    if init.worker != worker:
        raise NotForThisWorker(init.worker, worker)
    if init.expires_at < now:
        raise InitExpired(init.nonce, f"expired at {init.expires_at:.3f}, now {now:.3f}")
    if init.issued_at < started_at:
        raise InitExpired(init.nonce, f"issued at {init.issued_at:.3f}, before this worker started "
                                      f"at {started_at:.3f}")
    ttl_ms = max(1000, int((init.expires_at - now) * 1000) + 1000)
    if not r.set(SEEN_PREFIX + worker + ":" + init.nonce, 1, nx=True, px=ttl_ms):
        raise InitReplayed(init.nonce)
    return init


def outcome(nonce: str | None, model: str, result: str, reason: str, at: float) -> dict[str, Any]:
    """What a heartbeat says about the latest Init."""
    return {"nonce": nonce, "model": model, "outcome": result, "reason": reason, "at": at}
