"""Streams through real processes: text is never shown twice when a worker dies,
and a streaming client that leaves while its job waits is refunded (real uvicorn)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from llama_tasks import stream as token_stream
from llama_tasks.constants import HERD_PREFIX
from router.core import views
from router.core.errors import StreamRestarted
from tests.processes import wait_for
from tests.stack import Stack, running_stack

pytestmark = pytest.mark.slow

#: Sampled (temperature 1), and a grammar that cannot end before max_tokens, so a kill lands mid-generation.
STORY = dict(prompt="Write a long story about a llama who learns to sail.", tokens=48, temperature=1.0,
             grammar="root ::= [a-z ]{300}")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    yield from running_stack("sqlite", tmp_path_factory)


def first_token_then_kill(stack: Stack, job_id: str) -> int:
    """SIGKILL the worker generating ``job_id`` once it has streamed its first token, then start another."""
    pid = None
    for event in token_stream.follow(stack.r, job_id, timeout_s=60):
        if event["event"] == "start":
            pid = int(event["pid"])
        if event["event"] == "token":
            break
    assert pid is not None and event["event"] == "token", event
    os.kill(pid, signal.SIGKILL)
    stack.replace_worker()
    return pid


def shown_text(pieces: list[tuple[str, str]]) -> str:
    """What a reader ends up holding: text after the last restart signal."""
    text = ""
    for kind, piece in pieces:
        text = "" if kind == "restart" else text + piece
    return text


def test_client_stream_never_shows_text_twice_after_a_worker_dies(stack: Stack) -> None:
    key, herder = stack.account(100_000)
    handle = herder.run(**STORY)
    pieces: list[tuple[str, str]] = []

    def read() -> None:
        while True:
            try:
                for piece in handle.stream(timeout=120):
                    pieces.append(("token", piece))
                return
            except StreamRestarted:
                pieces.append(("restart", ""))  # documented: discard and follow again

    reader = threading.Thread(target=read)
    reader.start()
    first_token_then_kill(stack, handle.id)
    result = handle.result(timeout=180)
    reader.join(timeout=60)
    assert not reader.is_alive()
    starts = [e for e in stack.r.xrange(token_stream.key(handle.id)) if e[1][b"event"] == b"start"]
    assert len(starts) >= 2, "the job was not generated a second time"
    assert shown_text(pieces) == result["text"]
    assert stack.captures(handle.id) == 1 and stack.books() == []


def test_sse_stream_never_shows_text_twice_after_a_worker_dies(stack: Stack) -> None:
    # Two choices: each is followed on its own, and a restart names the choice it voids.
    gateway = stack.gateway_url()
    key, _ = stack.account(100_000)
    body = {"model": "smollm2", "prompt": STORY["prompt"], "max_tokens": STORY["tokens"], "temperature": 1.0,
            "grammar": STORY["grammar"], "stream": True, "n": 2}
    pieces: dict[int, list[tuple[str, str]]] = {0: [], 1: []}
    job: dict[str, str] = {}
    started = threading.Event()

    def read() -> None:
        with httpx.stream("POST", gateway + "/v1/completions", json=body, timeout=180,
                          headers={"Authorization": f"Bearer {key}"}) as reply:
            job["id"] = reply.headers["X-Llamas-Job"]
            started.set()
            for line in reply.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "llamas_restart" in chunk:
                    pieces[chunk["llamas_restart"]["index"]].append(("restart", ""))
                for choice in chunk.get("choices", []):
                    pieces[choice["index"]].append(("token", choice["text"]))

    reader = threading.Thread(target=read)
    reader.start()
    assert started.wait(60)
    first_token_then_kill(stack, job["id"])
    reader.join(timeout=180)
    assert not reader.is_alive()
    row = stack.job(job["id"])
    assert row.state == "done"
    choices = views.response(row)["choices"]
    assert len(choices) == 2
    for choice in choices:
        assert shown_text(pieces[choice["index"]]) == choice["text"]
    assert stack.captures(row.id) == 1 and stack.books() == []


@pytest.fixture
def ghost(stack: Stack) -> Iterator[str]:
    """A model whose one slot is taken by a job nobody runs: anything else for it waits, deterministically."""
    from pathlib import Path

    from llama_tasks import registry

    models_file = Path(stack.env["LLAMAS_HOME"]) / "models.json"
    before = models_file.read_text() if models_file.exists() else None
    name = f"ghost{uuid.uuid4().hex[:6]}"
    registry.add_model(models_file, name, Path(registry.smollm2_path()))
    stack.r.set(HERD_PREFIX + f"{name}@test", json.dumps({"worker": f"{name}@test", "model": name, "slots": 1}),
                ex=600)
    _, herder = stack.account(10_000)
    occupant = herder.run("I take the only slot", tokens=4, model=name)
    wait_for(lambda: stack.job(occupant.id).state == "running", what="the ghost slot to be taken")
    try:
        yield name
    finally:
        stack.r.delete(HERD_PREFIX + f"{name}@test")
        if before is None:
            models_file.unlink()
        else:
            models_file.write_text(before)


@pytest.mark.parametrize("chat", [True, False])
def test_a_streaming_client_that_leaves_while_queued_is_cancelled_and_refunded(stack: Stack, ghost: str,
                                                                              chat: bool) -> None:
    gateway = stack.gateway_url()
    key, _ = stack.account(10_000)
    ref = f"leaver-{uuid.uuid4().hex}"
    body: dict[str, Any] = {"model": ghost, "max_tokens": 8, "stream": True, "reference": ref}
    if chat:
        body["messages"] = [{"role": "user", "content": "Wait for me"}]
    else:
        body["prompt"] = "Wait for me"
    path = "/v1/chat/completions" if chat else "/v1/completions"
    with httpx.stream("POST", gateway + path, json=body, timeout=30,
                      headers={"Authorization": f"Bearer {key}"}) as reply:
        assert reply.status_code == 200
        job_id = reply.headers["X-Llamas-Job"]
        lines = reply.iter_lines()  # kept: dropping the iterator would close the connection already
        if chat:
            assert next(lines).startswith("data: ")  # the role chunk: the client has started reading
        assert stack.job(job_id).state == "queued"
    # The connection is closed: the gateway notices and cancels the queued job.
    row = wait_for(lambda: (r := stack.job(job_id)).state == "cancelled" and r, 30, "the job to be cancelled")
    assert row.reference == ref and row.refunded == row.offered and not row.charged
    assert stack.balance(key) == 10_000
    assert stack.books() == []


def test_a_late_reader_starts_at_the_newest_attempt(r: Any) -> None:
    job_id = uuid.uuid4().hex
    first = token_stream.StreamWriter(r, job_id, 1, 60)
    first.start("w", 1)
    first.token("Write")
    second = token_stream.StreamWriter(r, job_id, 1, 60)
    second.start("w", 2)
    second.token("Write a story")
    second.end("length")
    events = list(token_stream.follow(r, job_id, timeout_s=5))
    assert [e["event"] for e in events] == ["start", "token", "end"]
    assert events[1]["text"] == "Write a story"


def test_streaming_a_job_cancelled_while_queued_ends_with_its_outcome(stack: Stack, ghost: str) -> None:
    from router.core.errors import JobFailed

    _, herder = stack.account(10_000)
    handle = herder.run("Wait for me", tokens=8, model=ghost)
    assert handle.status() == "queued"
    handle.cancel()
    started = time.monotonic()
    with pytest.raises(JobFailed) as failed:
        list(handle.stream(timeout=60))
    assert failed.value.state == "cancelled"
    assert time.monotonic() - started < 30  # told, not left to time out


def test_a_long_silence_is_our_timeout_not_the_sockets(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url, socket_timeout=2)
    with pytest.raises(TimeoutError) as waited:
        list(token_stream.follow(client, uuid.uuid4().hex, timeout_s=3))
    assert not isinstance(waited.value, redis.RedisError)
