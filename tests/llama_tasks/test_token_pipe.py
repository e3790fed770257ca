"""Token events sent off the engine's thread (``TokenPipe``): in order, all of them, failures surfaced (real Redis)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis

from llama_tasks import stream
from llama_tasks.stream import StreamWriter, TokenPipe


@pytest.fixture
def pipe(r: Any) -> Iterator[TokenPipe]:
    started = TokenPipe(r).start()
    yield started
    started.close()


def _texts(r: Any, job_id: str) -> list[tuple[str, str]]:
    return [(f[b"event"].decode(), f.get(b"text", b"").decode()) for _, f in r.xrange(stream.key(job_id))]


def test_each_streams_events_arrive_in_order_with_end_after_every_token(r: Any, pipe: TokenPipe) -> None:
    jobs = [uuid.uuid4().hex for _ in range(3)]
    writers = [StreamWriter(r, job, 1, 60, pipe) for job in jobs]
    for w in writers:
        w.start("w@test", 1)
    for i in range(200):
        for w in writers:
            w.token(f"{i} ")
    for w in writers:
        w.end("stop")  # waits for its tokens: the end is last
    for job in jobs:
        events = _texts(r, job)
        assert events[0][0] == "start" and events[-1] == ("end", "")
        assert [text for event, text in events if event == "token"] == [f"{i} " for i in range(200)]
    r.delete(*[stream.key(job) for job in jobs])


def test_a_reader_sees_every_token_once_the_writer_has_flushed(r: Any, pipe: TokenPipe) -> None:
    job = uuid.uuid4().hex
    writer = StreamWriter(r, job, 1, 60, pipe)
    writer.start("w@test", 1)
    writer.token("Hello", 0)
    writer.token(" there", 0)
    writer.flush()
    assert [t for e, t in _texts(r, job) if e == "token"] == ["Hello", " there"]
    r.delete(stream.key(job))


def test_a_token_the_pipe_could_not_send_fails_the_next_write_and_the_error_event_still_goes(r: Any) -> None:
    job = uuid.uuid4().hex
    gone = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.2)  # nothing listens there
    pipe = TokenPipe(gone).start()
    try:
        writer = StreamWriter(r, job, 1, 60, pipe)
        writer.start("w@test", 1)
        writer.token("lost")
        with pytest.raises(redis.ConnectionError):
            writer.flush()
        with pytest.raises(redis.ConnectionError):
            writer.token("next")  # the engine fails this job, as with a direct write
        with pytest.raises(redis.ConnectionError):
            writer.end("stop")
        writer.error("RedisError", "the broker went away")  # the reader is still told
        assert [e for e, _ in _texts(r, job)] == ["start", "error"]
    finally:
        pipe.close()
        r.delete(stream.key(job))


def test_closing_sends_what_is_queued(r: Any) -> None:
    job = uuid.uuid4().hex
    pipe = TokenPipe(r).start()
    writer = StreamWriter(r, job, 1, 60, pipe)
    for i in range(50):
        writer.token(str(i))
    pipe.close()
    assert len(_texts(r, job)) == 50
    r.delete(stream.key(job))


def test_the_engine_s_step_end_sends_what_the_step_queued(r: Any, pipe: TokenPipe) -> None:
    from tests.processes import wait_for

    job = uuid.uuid4().hex
    writer = StreamWriter(r, job, 1, 60, pipe)
    for i in range(5):
        writer.token(str(i))
    pipe.send_now()  # what BatchEngine.after_step calls in a worker
    wait_for(lambda: len(_texts(r, job)) == 5, 10, "the step's tokens in the stream")
    r.delete(stream.key(job))


def test_an_unexpected_error_while_sending_fails_the_writer_and_the_pipe_goes_on(r: Any) -> None:
    # Not a RedisError (a bug, a broken connection object): the pipe's thread must not die with it,
    # or every writer waiting on it would wait for ever.
    class Broken:
        def pipeline(self, transaction: bool = False) -> Any:
            raise RuntimeError("not a Redis error")

    job = uuid.uuid4().hex
    pipe = TokenPipe(Broken()).start()  # type: ignore[arg-type]
    try:
        writer = StreamWriter(r, job, 1, 60, pipe)
        writer.token("lost")
        with pytest.raises(RuntimeError):
            writer.flush()
        other = StreamWriter(r, uuid.uuid4().hex, 1, 60, pipe)
        other.token("also lost")
        with pytest.raises(RuntimeError):
            other.flush()  # the thread is still there to say so
    finally:
        pipe.close()
