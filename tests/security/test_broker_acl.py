"""Broker credentials held to their roles, tried as each participant with exactly what the CLI gives.

Anyone with the service's Redis URL had full trust. An operator's workers and
a requester's client now get a Redis ACL user each (``router.core.broker_access``);
these tests take the URLs ``llamas operators add`` and ``llamas broker client``
print, run kombu, Celery and the client with them, and try what each must
not do. The ACL users are the server's, not one database's: each test makes
users of unique names and deletes them afterwards.
"""

from __future__ import annotations

import base64
import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Queue
from sqlalchemy.orm import Session
from typer.testing import CliRunner

from llama_tasks import control, registry
from llama_tasks import stream as token_stream
from llama_tasks.constants import CLAIM_PREFIX, HERD_PREFIX, RESULTS_STREAM
from llama_tasks.settings import IDLE_QUEUE, queue_for, unacked_keys
from router import Herder
from router.admin import HerdAdmin
from router.cli.main import app as cli_app
from router.core import broker_access, ledger
from router.core.db import make_engine, make_sessionmaker, upgrade
from router.core.errors import ModelNotPermitted
from router.core.keys import RESPONSE_PREFIX
from router.core.settings import HerderSettings, get_settings
from tests.processes import CeleryProcess, llama_worker
from tests.stack import Stack, running_stack


def _cli(db_url: str, home: Path, redis_url: str, *args: str) -> Any:
    """Run ``llamas …`` as the service's admin would, on ledger ``db_url``."""
    env = {"LLAMAS_DATABASE_URL": db_url, "LLAMAS_HOME": str(home), "LLAMAS_REDIS_URL": redis_url}
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(cli_app, list(args), env=env)
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    return result


def _url(output: str) -> str:
    [url] = [line for line in output.splitlines() if line.startswith("redis://")]
    return url


class Credentials:
    """An operator (serving one model) and a requester, registered and given broker users by the CLI."""

    def __init__(self, db_url: str, home: Path, redis_url: str, model: str = "smollm2") -> None:
        tag = uuid.uuid4().hex[:8]
        self.operator, self.requester, self.model = f"op-{tag}", f"req-{tag}", model
        upgrade(db_url)
        engine = make_engine(db_url)
        self.sessions = make_sessionmaker(engine)
        with self.sessions.begin() as session:
            _, self.api_key = ledger.create_account(session, self.requester, 1_000_000)
        added = _cli(db_url, home, redis_url, "operators", "add", self.operator, "--model", model)
        self.operator_output = added.stdout
        self.operator_url = _url(added.stdout)
        self.key_file = home / "operators" / f"{self.operator}.key"
        self.client_url = _url(_cli(db_url, home, redis_url, "broker", "client", self.requester).stdout)
        self.users = [broker_access.user_name(broker_access.OPERATOR, self.operator),
                      broker_access.user_name(broker_access.CLIENT, self.requester)]

    def delete_users(self, r: redis.Redis) -> None:
        r.execute_command("ACL", "DELUSER", *self.users)


@pytest.fixture
def creds(tmp_path: Path, redis_url: str, r: redis.Redis) -> Iterator[Credentials]:
    made = Credentials(f"sqlite:///{tmp_path / 'ledger.db'}", tmp_path / "home", redis_url, model=f"m{uuid.uuid4().hex[:6]}")
    yield made
    made.delete_users(r)


def refused(call: Callable[[], Any]) -> None:
    """``call`` fails with NOPERM (no permission), not for any other reason."""
    with pytest.raises(redis.exceptions.NoPermissionError):
        call()


def _denials(r: redis.Redis, users: list[str]) -> list[str]:
    """What Redis refused these users since the log was last read (its ACL LOG)."""
    entries = r.execute_command("ACL", "LOG", "128")
    found = []
    for entry in entries:
        doc = dict(zip(entry[::2], entry[1::2], strict=False)) if isinstance(entry, list) else entry
        doc = {(k.decode() if isinstance(k, bytes) else k): v for k, v in doc.items()}
        user = doc.get("username", b"")
        if (user.decode() if isinstance(user, bytes) else user) in users:
            found.append(f"{doc.get('reason')!r} {doc.get('object')!r}")
    return found


# --- the rules, tried command by command ---------------------------------------------------------


def test_an_operator_credential_reaches_its_own_keys_only(creds: Credentials, r: redis.Redis) -> None:
    op = redis.Redis.from_url(creds.operator_url)
    assert op.ping()
    job = uuid.uuid4().hex
    # What its worker does.
    assert op.set(f"{CLAIM_PREFIX}{job}:1", "{}", nx=True, ex=60) and op.get(f"{CLAIM_PREFIX}{job}:1") == b"{}"
    op.xadd(f"llamas:stream:{job}", {"event": "start"})
    op.expire(f"llamas:stream:{job}", 60)
    assert op.exists(f"llamas:cancel:{job}") == 0
    op.set(f"{HERD_PREFIX}{creds.operator}/w1@host", "{}", px=1000)
    op.xadd(RESULTS_STREAM, {"doc": "{}"}, maxlen=10_000, approximate=True)
    assert op.brpop([queue_for(creds.model)], timeout=1) is None
    assert op.brpop([queue_for(creds.model), IDLE_QUEUE], timeout=1) is None  # a worker with no model, or changing
    # Its own workers' Inits: popped, each nonce taken once; no one else's.
    assert op.blpop([f"{control.CONTROL_PREFIX}{creds.operator}/w1@host"], timeout=1) is None
    assert op.set(f"{control.SEEN_PREFIX}{creds.operator}/w1@host:n1", 1, nx=True, px=1000)

    refused(lambda: op.blpop([f"{control.CONTROL_PREFIX}someone-else/w1@host"], timeout=1))
    refused(lambda: op.blpop([f"{control.CONTROL_PREFIX}w1@house"], timeout=1))
    refused(lambda: op.rpush(f"{control.CONTROL_PREFIX}{creds.operator}/w1@host", "{}"))  # only the herder sends Inits
    refused(lambda: op.set(f"{control.SEEN_PREFIX}someone-else/w1@host:n1", 1))
    refused(lambda: op.brpop(["llama.other-model"], timeout=1))   # another model's queue
    refused(lambda: op.brpop(["herder"], timeout=1))              # the herder's
    refused(lambda: op.lrange(queue_for(creds.model), 0, -1))     # its own queue's contents
    refused(lambda: op.llen(queue_for(creds.model)))
    refused(lambda: op.xread({RESULTS_STREAM: "0"}))              # everyone's results
    refused(lambda: op.xrange(RESULTS_STREAM))
    refused(lambda: op.xrange(f"llamas:stream:{job}"))             # token streams are write-only
    refused(lambda: op.keys("*"))
    refused(lambda: op.scan(0))
    refused(lambda: op.randomkey())
    refused(lambda: op.hgetall("unacked:someone-else"))           # another operator's jobs in flight
    refused(lambda: op.hgetall("unacked"))                        # the house's
    refused(lambda: op.sadd(f"_kombu.binding.{queue_for(creds.model)}", "x\x06\x16\x06\x16mine"))
    refused(lambda: op.sadd("_kombu.binding.herder", "herder\x06\x16\x06\x16mine"))
    refused(lambda: op.publish("/0.celery.pidbox", "shutdown"))   # remote control of other workers
    refused(lambda: op.set(f"{HERD_PREFIX}someone-else/w1@host", "{}"))
    refused(lambda: op.set(f"{HERD_PREFIX}w1@house", "{}"))
    refused(lambda: op.delete(f"{HERD_PREFIX}someone-else/w1@host"))
    refused(lambda: op.get(f"{RESPONSE_PREFIX}{job}"))
    refused(lambda: op.blpop([f"llamas:notify:{job}"], timeout=1))
    refused(lambda: op.flushall())
    refused(lambda: op.flushdb())
    refused(lambda: op.config_get("*"))
    refused(lambda: op.execute_command("ACL", "WHOAMI"))
    refused(lambda: op.execute_command("ACL", "SETUSER", creds.users[0], "+@all", "~*"))
    refused(lambda: op.delete(f"{CLAIM_PREFIX}{job}:1"))
    refused(lambda: op.lpush(queue_for("other-model"), "{}"))
    # Redis logged each refusal under the operator's user: what the other tests assert is empty.
    assert any("flushall" in line for line in _denials(r, creds.users))
    r.delete(f"{CLAIM_PREFIX}{job}:1", f"llamas:stream:{job}", f"{HERD_PREFIX}{creds.operator}/w1@host")


def test_a_client_credential_submits_and_reads_answers_only(creds: Credentials, r: redis.Redis) -> None:
    client = redis.Redis.from_url(creds.client_url)
    job = uuid.uuid4().hex
    assert client.get(f"{RESPONSE_PREFIX}{job}") is None
    assert client.blpop([f"llamas:notify:{job}"], timeout=1) is None
    assert client.xrange(f"llamas:stream:{job}") == []
    assert client.get(f"celery-task-meta-{job}") is None

    refused(lambda: client.xadd(RESULTS_STREAM, {"doc": "{}"}))
    refused(lambda: client.xread({RESULTS_STREAM: "0"}))
    refused(lambda: client.set(f"{CLAIM_PREFIX}{job}:1", "{}"))
    refused(lambda: client.get(f"{CLAIM_PREFIX}{job}:1"))
    refused(lambda: client.brpop([queue_for("smollm2")], timeout=1))
    refused(lambda: client.brpop(["herder"], timeout=1))
    refused(lambda: client.lpush(queue_for("smollm2"), "{}"))
    refused(lambda: client.lrange("herder", 0, -1))
    refused(lambda: client.keys("*"))
    refused(lambda: client.scan(0))
    refused(lambda: client.publish("/0.celery.pidbox", "shutdown"))
    refused(lambda: client.sadd("_kombu.binding.herder", "herder\x06\x16\x06\x16mine"))
    refused(lambda: client.xadd(f"llamas:stream:{job}", {"event": "token"}))
    refused(lambda: client.set(f"{RESPONSE_PREFIX}{job}", "{}"))
    refused(lambda: client.set(f"celery-task-meta-{job}", "{}"))
    refused(lambda: client.set(f"{HERD_PREFIX}w1@host", "{}"))
    refused(lambda: client.flushall())
    refused(lambda: client.execute_command("ACL", "LIST"))


def test_the_herder_restores_users_from_the_ledger_with_their_passwords_unknown(
        creds: Credentials, r: redis.Redis) -> None:
    r.execute_command("ACL", "DELUSER", *creds.users)  # as a Redis restarted without an ACL file
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(creds.client_url).ping()
    session: Session
    with creds.sessions.begin() as session:
        assert broker_access.sync(session, r) == 2
    assert redis.Redis.from_url(creds.client_url).ping() and redis.Redis.from_url(creds.operator_url).ping()
    with creds.sessions.begin() as session:
        stored = {u.name: u for u in broker_access.users(session)}
        assert len(stored[creds.users[0]].password_sha256) == 64
        assert creds.operator_url.split(":")[2].split("@")[0] not in json.dumps(
            [u.password_sha256 for u in stored.values()])
        broker_access.revoke(session, creds.users[1])
        broker_access.sync(session, r)
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis.from_url(creds.client_url).ping()


def test_the_operator_credential_is_printed_once_with_how_to_start_a_worker(creds: Credentials) -> None:
    text = creds.operator_output.replace("\n", " ")
    assert "shown only once" in text and f"LLAMAS_OPERATOR={creds.operator}" in text
    assert "celery -A llama_tasks worker -Q llama.<model>" in text and creds.operator_url.count("@") == 1


def test_kombu_keeps_and_restores_an_operators_unacked_messages_under_its_own_keys(
        creds: Credentials, r: redis.Redis, redis_url: str) -> None:
    queue = queue_for(creds.model)
    with Connection(redis_url) as admin:  # the herder: binds the queue, then sends a job
        broker_access.declare_queues(admin.default_channel, [queue])
        admin.Producer().publish({"job": 1}, exchange=queue, routing_key=queue, serializer="json")
    keys = unacked_keys(creds.operator)
    options = {**keys, "visibility_timeout": 0}
    bound = Queue(queue, Exchange(queue), routing_key=queue, no_declare=True)
    try:
        with Connection(creds.operator_url, transport_options=options) as conn:
            channel = conn.channel()
            message = bound(channel).get(no_ack=False)
            assert message is not None and message.payload == {"job": 1}
            assert r.hlen(keys["unacked_key"]) == 1
            message.requeue()  # as a task rejected on worker lost: back to the front of its queue
            assert r.hlen(keys["unacked_key"]) == 0 and r.llen(queue) == 1

            again = bound(channel).get(no_ack=False)
            assert again is not None and r.llen(queue) == 0
            # A worker gone for good: past the visibility timeout, a restore sweep puts it back.
            channel.qos.restore_visible(num=10, interval=1)
            assert r.llen(queue) == 1 and r.hlen(keys["unacked_key"]) == 0
            channel.close()
        assert _denials(r, creds.users) == []
    finally:
        r.delete(queue, f"_kombu.binding.{queue}", f"_kombu.binding_permanent.{queue}", *keys.values())


# --- the real service ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def acl_stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[tuple[Stack, Credentials]]:
    made: list[Credentials] = []

    def prepare(db_url: str, tmp: Path) -> dict[str, str]:
        made.append(Credentials(db_url, tmp / "admin-home", redis_url))
        return {}

    stack_gen = running_stack("sqlite", tmp_path_factory, prepare)
    stack = next(stack_gen)
    try:
        yield stack, made[0]
    finally:
        made[0].delete_users(redis.Redis.from_url(redis_url))
        next(stack_gen, None)


def _events(r: redis.Redis) -> Any:
    """A subscription to every Celery event, as Flower has (the service's own, full-rights user)."""
    db = r.connection_pool.connection_kwargs.get("db", 0)
    sub = r.pubsub()
    sub.psubscribe(f"/{db}.celeryev/*")
    return sub


def _seen_hostnames(sub: Any, until: float) -> set[str]:
    seen = set()
    while time.monotonic() < until:
        msg = sub.get_message(timeout=0.5)
        if msg and msg["type"] == "pmessage":
            body = json.loads(msg["data"])["body"]
            event = json.loads(base64.b64decode(body))
            for one in event if isinstance(event, list) else [event]:
                seen.add(f"{one.get('type')} {one.get('hostname')}")
    return seen


@pytest.mark.slow
def test_a_job_runs_end_to_end_through_an_acl_operator_worker_and_an_acl_client(
        acl_stack: tuple[Stack, Credentials], tmp_path: Path) -> None:
    stack, creds = acl_stack
    admin = stack.r
    events = _events(admin)
    # Only the operator's worker serves the model: the house's goes.
    stack.worker.stop()
    env = dict(stack.env, LLAMAS_REDIS_URL=creds.operator_url, LLAMAS_OPERATOR=creds.operator,
               LLAMAS_OPERATOR_KEY=str(creds.key_file))
    worker = llama_worker("opw", 1, env, tmp_path / "operator-worker.log")
    try:
        worker.wait_ready(admin)
        herder = Herder(creds.api_key, redis_url=creds.client_url)
        handle = herder.run("Name one animal.", 8, temperature=0.0)
        streamed = list(token_stream.follow(herder.redis, handle.id, timeout_s=60))
        response = handle.result(timeout=60)
        assert response["status"] == "done" and response["worker"] == worker.worker, response
        assert any(event["event"] == "token" for event in streamed), streamed
        assert stack.job(handle.id).operator == creds.operator  # its signed result was credited
        # Acknowledged late under its own keys: nothing of it left in flight.
        assert admin.hlen(unacked_keys(creds.operator)["unacked_key"]) == 0
        # Flower's feed carries the worker, though it takes no part in remote control.
        seen = _seen_hostnames(events, time.monotonic() + 3)
        assert any(worker.name in line for line in seen), seen
        # Nothing kombu, Celery, the worker or the client sent was refused.
        assert _denials(admin, creds.users) == [], worker.output()[-3000:]
        assert {c["user"] for c in admin.client_list()} >= {creds.users[0], creds.users[1]}
    finally:
        events.close()
        worker.stop()


@pytest.mark.slow
def test_an_operators_worker_with_no_model_is_initialised_under_its_acl_user(
        acl_stack: tuple[Stack, Credentials], tmp_path: Path) -> None:
    stack, creds = acl_stack
    admin_redis = stack.r
    stack.worker.stop()  # only the operator's worker serves
    env = dict(stack.env, LLAMAS_REDIS_URL=creds.operator_url, LLAMAS_OPERATOR=creds.operator,
               LLAMAS_OPERATOR_KEY=str(creds.key_file))
    worker = CeleryProcess("llama_tasks", queue_for("smollm2"), "opidle", 1, env, tmp_path / "idle.log", ["--no-model"])
    try:
        assert worker.wait_ready(admin_redis)["state"] == "idle"
        # The admin on the herder's machine: its key, and a registry with a model this operator may not serve.
        home = tmp_path / "admin"
        home.mkdir()
        for name in ("herder.key", "herder.pub"):
            (home / name).write_bytes((Path(os.environ["LLAMAS_HOME"]) / name).read_bytes())
        registry.add_model(home / "models.json", "second", registry.smollm2_path())
        admin = HerdAdmin(HerderSettings(home=home, database_url=stack.db_url, redis_url=stack.env["LLAMAS_REDIS_URL"]))
        with pytest.raises(ModelNotPermitted):
            admin.init(worker.worker, "second")
        assert admin.init(worker.worker, "smollm2", timeout_s=60)["model"] == "smollm2"
        handle = Herder(creds.api_key, redis_url=creds.client_url).run("Name one animal.", 8, temperature=0.0)
        assert handle.result(timeout=60)["worker"] == worker.worker
        # Nothing the Init, the queue change or the job sent was refused to the operator's user.
        assert _denials(admin_redis, creds.users) == [], worker.output()[-3000:]
    finally:
        worker.stop()
