"""Broker users: what each outside participant may do in Redis, and applying it.

Whoever holds the service's Redis URL has full trust. Operators (their
inference workers) and requesters using the Python client each get a Redis
ACL user instead, allowed exactly the commands their role sends, each on
the keys it needs (Redis 7 selectors: ``(~pattern +command)``). Job and task
ids are uuid4 hex chosen by the herder, and no role may enumerate keys or
read a queue's contents, so a role's access to ``llamas:stream:*`` or
``celery-task-meta-*`` reaches only the jobs it was handed.

A user's password is shown once; Redis keeps only its sha256 (``#<hex>``),
and so does the ledger (``models.BrokerUser``), from which the herder
re-applies every user after a Redis restart (``sync``). See
docs/broker-access.md for the rules and what they cost.

Plain functions over the caller's session and Redis client; none commits.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session

from llama_tasks import control, results
from llama_tasks.constants import CANCEL_PREFIX, CLAIM_PREFIX, HERD_PREFIX, RESULTS_STREAM, STREAM_PREFIX
from llama_tasks.settings import IDLE_QUEUE, queue_for, unacked_keys
from router.core import ledger
from router.core.errors import BrokerUserExists, UnknownBrokerUser
from router.core.keys import NOTIFY_PREFIX, RESPONSE_PREFIX
from router.core.models import BrokerUser
from router.core.settings import HERDER_QUEUE

OPERATOR = "operator"
CLIENT = "client"
ROLES = (OPERATOR, CLIENT)

#: kombu's Redis transport: a queue's binding table, and the separator of a
#: priority queue's name (``<queue>\x06\x16<priority>``; a BRPOP names them all).
BINDING_PREFIX = "_kombu.binding."
PRIORITY_SEP = "\x06\x16"
#: Celery's result backend: the key of a task's state (and the channel it is published on).
TASK_META_PREFIX = "celery-task-meta-"
#: kombu's fanout channels are ``/<db>.<exchange>/<routing key>``; Flower listens on ``celeryev``.
EVENTS_CHANNEL = "/*.celeryev/"

#: What every role's connection sends before and around its commands.
CONNECTION = ("+ping", "+select", "+hello", "+client|setname",
              "+multi", "+exec", "+discard", "+unwatch", "+unsubscribe", "+punsubscribe")

_GLOB = re.compile(r"([*?\[\]\\])")


def _literal(text: str) -> str:
    """``text`` as a Redis glob matching only itself (a model may be called anything)."""
    return _GLOB.sub(r"\\\1", text)


def _selector(keys: Iterable[str] = (), commands: Iterable[str] = (), channels: Iterable[str] = ()) -> str:
    """One ACL selector: these commands, on these key patterns and channels only."""
    return "(" + " ".join([*keys, *channels, *commands]) + ")"


def _queue_keys(queues: Sequence[str], access: str) -> list[str]:
    """Key patterns of Redis queues, their priority lists included (``~`` or ``%R~``/``%W~`` in ``access``)."""
    return [f"{access}{pattern}" for queue in queues for pattern in (queue, queue + PRIORITY_SEP + "*")]


def operator_queues(models: Sequence[str]) -> list[str]:
    """The queue patterns an operator serving ``models`` consumes; no models: every model's queue."""
    return [_literal(queue_for(model)) for model in models] or [_literal(queue_for("")) + "*"]


def operator_rules(operator: str, models: Sequence[str] = ()) -> list[str]:
    """The ACL rules of operator ``operator``'s workers, serving ``models`` (none: every model).

    Each line is what ``llama_tasks`` sends, and nothing to read what others
    send: its queues and the idle one (BRPOP; a restore pushes a message back), the binding
    table of its queues (SMEMBERS: where a restore or an error callback goes),
    its own unacknowledged messages, its own workers' Inits (BLPOP, and a SET
    NX of each nonce), the results stream (XADD only), its own
    kept answers, token streams (write only), claims, cancel flags (EXISTS), its own heartbeats,
    its tasks' states, events for Flower, and the herder's queue for the
    error callback of a failed generation (as any requester may).
    """
    queues = operator_queues(models)
    unacked = unacked_keys(operator)
    herd = _literal(f"{HERD_PREFIX}{operator}/") + "*"
    # A worker with no model listens on the idle queue, beside its model queues while it changes models.
    consumed = [*queues, _literal(IDLE_QUEUE)]
    return [
        *CONNECTION,
        _selector(_queue_keys(consumed, "~"), ("+brpop", "+rpop", "+lpush", "+rpush")),
        # Its own workers' Inits: popped from their lists, each nonce taken once.
        _selector([f"~{_literal(control.CONTROL_PREFIX + operator + '/')}*"], ["+blpop"]),
        _selector([f"~{_literal(control.SEEN_PREFIX + operator + '/')}*"], ["+set"]),
        _selector([f"%R~{_literal(BINDING_PREFIX)}{q}" for q in queues]
                  + [f"%R~{_literal(BINDING_PREFIX + HERDER_QUEUE)}"], ["+smembers"]),
        _selector([f"~{_literal(unacked['unacked_key'])}", f"~{_literal(unacked['unacked_index_key'])}"],
                  ("+zadd", "+zrem", "+zrange", "+hset", "+hget", "+hdel", "+watch")),
        # kombu's restore mutex: redis-py's lock (SET NX PX, released by a script that GETs and DELs).
        _selector([f"~{_literal(unacked['unacked_mutex_key'])}"], ("+set", "+get", "+del", "+evalsha")),
        "+script|load",
        _selector([f"%W~{_literal(RESULTS_STREAM)}"], ["+xadd"]),
        _selector([f"%W~{_literal(STREAM_PREFIX)}*"], ("+xadd", "+expire")),
        _selector([f"~{_literal(CLAIM_PREFIX)}*"], ("+set", "+get")),
        # Its own workers' kept answers (a redelivered message returns its attempt's).
        _selector([f"~{_literal(results.answer_prefix(operator))}*"], ("+set", "+get")),
        _selector([f"%R~{_literal(CANCEL_PREFIX)}*"], ["+exists"]),
        _selector([f"%W~{herd}"], ("+set", "+del")),
        _selector([f"~{TASK_META_PREFIX}*"], ("+get", "+set", "+setex")),
        _selector(commands=["+publish"], channels=[f"&{TASK_META_PREFIX}*"]),
        _selector(commands=["+publish"], channels=[f"&{EVENTS_CHANNEL}*"]),
        _selector(_queue_keys([_literal(HERDER_QUEUE)], "%W~"), ["+lpush"]),
    ]


def reachable_models(session: Session, worker: str) -> list[str] | None:
    """The models whose queues ``worker``'s broker credential lets it take; None: every model.

    A house worker may serve anything; an operator's worker (``<operator>/<host>``)
    what its operator's broker user names (none named: every model), so no
    Init moves it to a queue that Redis would refuse it.
    """
    operator, slash, _ = worker.partition("/")
    if not slash:
        return None
    user = session.scalar(select(BrokerUser).where(BrokerUser.name == user_name(OPERATOR, operator)))
    return None if user is None or not user.model_names else user.model_names


def may_serve(session: Session, worker: str, model: str) -> bool:
    """Whether ``worker``'s broker credential lets it take ``model``'s queue (``reachable_models``)."""
    reachable = reachable_models(session, worker)
    return reachable is None or model in reachable


def within_reach(session: Session, heartbeat: dict[str, Any]) -> dict[str, Any]:
    """A worker's heartbeat with only the models its broker credential reaches left in ``can_load``."""
    loadable = heartbeat.get("can_load") or []
    reachable = reachable_models(session, str(heartbeat.get("worker") or "")) if loadable else None
    if reachable is None:
        return heartbeat
    return heartbeat | {"can_load": [m for m in loadable if m.get("model") in reachable]}


def client_rules() -> list[str]:
    """The ACL rules of a requester's Python client (``router.client.Herder``).

    It sends requests to the herder's queue (LPUSH, after reading where the
    queue is bound), waits for their answers (the result backend: SUBSCRIBE,
    GET, DEL to forget), reads a finished job's response (BLPOP on its notify
    list, GET), follows token streams, and says it sent a task (Flower).
    """
    return [
        *CONNECTION,
        _selector(_queue_keys([_literal(HERDER_QUEUE)], "%W~"), ["+lpush"]),
        _selector([f"%R~{_literal(BINDING_PREFIX + HERDER_QUEUE)}"], ["+smembers"]),
        _selector([f"~{TASK_META_PREFIX}*"], ("+get", "+del")),
        _selector(commands=["+subscribe"], channels=[f"&{TASK_META_PREFIX}*"]),
        _selector([f"%R~{_literal(RESPONSE_PREFIX)}*"], ["+get"]),
        _selector([f"~{_literal(NOTIFY_PREFIX)}*"], ["+blpop"]),
        _selector([f"%R~{_literal(STREAM_PREFIX)}*"], ("+xrange", "+xread")),
        _selector(commands=["+publish"], channels=[f"&{EVENTS_CHANNEL}task.sent"]),
    ]


def rules(user: BrokerUser) -> list[str]:
    """The ACL rules of a stored user, by its role."""
    if user.role == OPERATOR:
        return operator_rules(user.owner, user.model_names)
    return client_rules()


# --- credentials --------------------------------------------------------------------


def user_name(role: str, owner: str) -> str:
    """The Redis user of ``owner``'s credential of ``role`` (``operator.alice``, ``client.bob``)."""
    return f"{role}.{owner}"


def new_password() -> tuple[str, str]:
    """A random password and its sha256 (hex), the only form kept."""
    password = secrets.token_urlsafe(32)
    return password, hashlib.sha256(password.encode()).hexdigest()


def broker_url(redis_url: str, user: str, password: str) -> str:
    """``redis_url`` (the herder's) with ``user``'s credentials in place of its own."""
    parts = urlsplit(redis_url)
    host = parts.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host
    netloc = f"{quote(user, safe='')}:{quote(password, safe='')}@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def create(session: Session, role: str, owner: str, models: Sequence[str] = ()) -> tuple[BrokerUser, str]:
    """Store a broker user of ``role`` for account ``owner``; returns it and its password (shown once).

    A revoked user of the same name is issued again with a new password;
    an active one is refused. Apply it with ``apply``.
    """
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}")
    account = ledger.account_by_name(session, owner)
    name = user_name(role, owner)
    password, digest = new_password()
    user = session.scalar(select(BrokerUser).where(BrokerUser.name == name))
    if user is not None and user.revoked_at is None:
        raise BrokerUserExists(name)
    if user is None:
        user = BrokerUser(name=name, role=role, owner=owner, account_id=account.id)
        session.add(user)
    user.models = ",".join(models)
    user.password_sha256 = digest
    user.created_at = datetime.now(UTC)
    user.revoked_at = None
    session.flush()
    return user, password


def revoke(session: Session, name: str) -> BrokerUser:
    """Mark broker user ``name`` revoked; remove it from Redis with ``apply``."""
    user = session.scalar(select(BrokerUser).where(BrokerUser.name == name))
    if user is None or user.revoked_at is not None:
        raise UnknownBrokerUser(name)
    user.revoked_at = datetime.now(UTC)
    return user


def users(session: Session, active_only: bool = False) -> list[BrokerUser]:
    query = select(BrokerUser).order_by(BrokerUser.name)
    if active_only:
        query = query.where(BrokerUser.revoked_at.is_(None))
    return list(session.scalars(query))


# --- Redis ----------------------------------------------------------------------------


def apply(r: redis.Redis, user: BrokerUser) -> None:
    """Make Redis's user match the stored one: its rules and password hash, or gone when revoked.

    ``reset`` first: a rule removed here is removed there too. Deleting a
    user closes its connections.
    """
    if user.revoked_at is not None:
        r.execute_command("ACL", "DELUSER", user.name)
        return
    r.execute_command("ACL", "SETUSER", user.name, "reset", "on", f"#{user.password_sha256}", *rules(user))


def sync(session: Session, r: redis.Redis) -> int:
    """Apply every stored user (after a Redis restart, or a user changed by hand); returns how many."""
    found = users(session)
    for user in found:
        apply(r, user)
    return len(found)


def declare_queues(channel: Any, names: Iterable[str]) -> None:
    """Bind each queue to its direct exchange of the same name, as Celery would (needs full rights).

    The restricted roles never declare (``llama_tasks.broker``): a worker that
    could add a binding could copy every job to a queue of its own.
    """
    from kombu import Exchange, Queue

    for name in names:
        Queue(name, Exchange(name, "direct"), routing_key=name).bind(channel).declare()
