"""Token streams: a Redis stream per job that requesters can follow live.

Events are ``start`` (one per attempt), ``token`` (a piece of one choice's
text: its ``index``, and with logprobs asked for, its tokens' ``logprobs`` as
JSON), then ``end`` (with the first choice's finish reason) or ``error``. The
choices of a job with ``n > 1`` write their pieces interleaved, as they are
made. An attempt that runs again after its worker was lost writes a new
``start`` and its text from the beginning; ``follow_text`` turns that into
what a reader must see: every piece of each choice's text once, and a
``restart`` event for a choice only when the new attempt's text contradicts
what was already shown of it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any, cast

import redis

from llama_tasks.constants import STREAM_PREFIX

#: Longest single blocking read of a stream, in seconds.
BLOCK_S = 1.0


def key(job_id: str) -> str:
    return STREAM_PREFIX + job_id


class TokenPipe:
    """Token events written off the batch engine's thread, every event waiting sent in one round trip.

    The engine makes a token of every active sequence each step; one ``XADD``
    each, on its own thread, is milliseconds a step at 64 sequences that the
    next decode waits for. Here the engine only queues them, and this pipe's
    thread sends what has queued in one pipelined call. One queue for every
    stream, first in first out, so each stream's events keep their order.
    ``start`` the thread; ``close`` sends what is left and stops it.
    """

    #: Most events in one round trip.
    BATCH = 1024
    #: Longest a queued event waits for ``send_now``.
    LINGER_S = 0.05

    def __init__(self, r: redis.Redis) -> None:
        self._r = r
        self._queue: deque[tuple[StreamWriter, str, dict[Any, Any]]] = deque()
        self._cond = threading.Condition()
        self._queued = self._sent = 0
        self._closing = False
        self._thread: threading.Thread | None = None

    def start(self) -> TokenPipe:
        self._thread = threading.Thread(target=self._run, name="llamas-tokens", daemon=True)
        self._thread.start()
        return self

    def put(self, writer: StreamWriter, stream: str, entry: dict[Any, Any]) -> int:
        """Queue one event; returns its number, for ``wait``. Sent at the next ``send_now``, or within
        ``LINGER_S``: woken for each event, the pipe's thread would take the interpreter from the
        engine's in the middle of its step."""
        with self._cond:
            self._queue.append((writer, stream, entry))
            self._queued += 1
            return self._queued

    def send_now(self) -> None:
        """Send what is queued (the engine calls it after each step, as its next decode begins)."""
        with self._cond:
            if self._queue:
                self._cond.notify_all()

    def wait(self, number: int) -> None:
        """Return once event ``number`` and every one before it has been sent (or failed)."""
        with self._cond:
            while self._sent < number and self._thread is not None and self._thread.is_alive():
                self._cond.notify_all()
                self._cond.wait(0.5)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait(self.LINGER_S)
                while not self._queue and not self._closing:
                    self._cond.wait(self.LINGER_S)
                if not self._queue:
                    return
                batch = [self._queue.popleft() for _ in range(min(len(self._queue), self.BATCH))]
            try:
                pipe = self._r.pipeline(transaction=False)
                for _, stream, entry in batch:
                    pipe.xadd(stream, entry)
                pipe.execute()
            except Exception as exc:  # noqa: BLE001 - whatever it is, this thread must go on: writers wait on it
                # The broker went away: every writer with an event here fails at its next write.
                for writer, _, _ in batch:
                    writer.failed = exc
            with self._cond:
                self._sent += len(batch)
                self._cond.notify_all()


class StreamWriter:
    """Appends one attempt's events to a job's stream.

    With a ``TokenPipe``, token events are queued there (``token`` returns at
    once) and ``end``, ``error`` and ``flush`` wait until they are sent; a
    token the pipe could not send fails the next write, as a direct write
    would have.
    """

    def __init__(self, r: redis.Redis, job_id: str, attempt: int, ttl_s: int, pipe: TokenPipe | None = None) -> None:
        self._r, self._key, self._attempt, self._ttl_s = r, key(job_id), str(attempt), ttl_s
        self._pipe = pipe
        self._last = 0
        #: Set by the pipe when one of this writer's events could not be sent.
        self.failed: BaseException | None = None

    def _add(self, event: str, *, after_failure: bool = False, **fields: str) -> None:
        entry: dict[Any, Any] = {"event": event, "attempt": self._attempt, **fields}
        if after_failure and self._pipe is not None and self._last:
            self._pipe.wait(self._last)  # an error event goes after the tokens, whatever became of them
        else:
            self.flush()
        self._r.xadd(self._key, entry)

    def flush(self) -> None:
        """Wait until every token queued so far is in the stream; raise what stopped one."""
        if self._pipe is not None and self._last:
            self._pipe.wait(self._last)
        if self.failed is not None:
            raise self.failed

    def start(self, worker: str, pid: int) -> None:
        pipe = self._r.pipeline()
        pipe.xadd(
            self._key, {"event": "start", "attempt": self._attempt, "worker": worker, "pid": pid}
        )
        pipe.expire(self._key, self._ttl_s)
        pipe.execute()

    def token(self, text: str, index: int = 0, logprobs: list[dict[str, Any]] | None = None) -> None:
        """A piece of choice ``index``'s text, with its tokens' log probability entries when asked for."""
        entry: dict[Any, Any] = {"event": "token", "attempt": self._attempt, "text": text, "index": str(index)}
        if logprobs is not None:
            entry["logprobs"] = json.dumps(logprobs)
        if self._pipe is None:
            self._r.xadd(self._key, entry)
            return
        if self.failed is not None:
            raise self.failed
        self._last = self._pipe.put(self, self._key, entry)

    def end(self, finish_reason: str) -> None:
        self._add("end", finish_reason=finish_reason)
        self._r.expire(self._key, self._ttl_s)

    def error(self, error: str, message: str) -> None:
        self._add("error", after_failure=True, error=error, message=message)
        self._r.expire(self._key, self._ttl_s)


def _decode(raw: dict[Any, Any]) -> dict[str, str]:
    return {
        (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
        for k, v in raw.items()
    }


def follow(r: redis.Redis, job_id: str, timeout_s: float = 60.0,
           ended: Callable[[], bool] | None = None) -> Iterator[dict[str, str]]:
    """Yield a job's raw events as they arrive, until ``end`` or ``error``.

    A reader that arrives late starts at the newest attempt's ``start``: what
    an interrupted attempt wrote before it is of no use to anyone. While the
    stream is silent, ``ended()`` (when given) says whether the job is over
    without having streamed (expired or cancelled while queued): then the
    iteration just stops. Raises ``TimeoutError`` when no event arrives for
    ``timeout_s``.
    """
    last = "0-0"
    existing = cast(list[Any], r.xrange(key(job_id)))
    starts = [i for i, (_, raw) in enumerate(existing) if _decode(raw).get("event") == "start"]
    for entry_id, raw in existing[starts[-1] if starts else 0:]:
        last = entry_id
        event = _decode(raw)
        yield event
        if event["event"] in ("end", "error"):
            return
    silent_until = time.monotonic() + timeout_s
    while True:
        # Short blocks: a client's socket timeout (redis-py's default is 5 s)
        # must not cut a long wait short, and ``ended`` is asked between them.
        block_ms = int(max(1.0, min(BLOCK_S, silent_until - time.monotonic())) * 1000)
        batch = cast(list[Any], r.xread({key(job_id): last}, block=block_ms, count=100))
        if not batch:
            if ended is not None and ended():
                return
            if time.monotonic() >= silent_until:
                raise TimeoutError(f"no stream event for job {job_id} in {timeout_s}s")
            continue
        silent_until = time.monotonic() + timeout_s
        for entry_id, raw in batch[0][1]:
            last = entry_id
            event = _decode(raw)
            yield event
            if event["event"] in ("end", "error"):
                return


#: What a follower shows: ``token`` (``index``, ``text``, ``logprobs``: a list or None),
#: ``restart`` (``index``, ``attempt``), and the raw ``end`` and ``error``.
Shown = dict[str, Any]


class TextFollower:
    """What a reader of one choice's text has been shown, across attempts.

    ``feed`` takes the choice's raw events in order and returns what to show:
    token pieces that extend the shown text (a new attempt retracing text
    already shown is silent), and ``restart`` followed by the new attempt's
    whole text when it departs from what was shown (the reader must discard
    it). Log probability entries travel with the text: each is shown once,
    and a restart shows the new attempt's all over again.
    """

    def __init__(self, index: int = 0) -> None:
        self.index = index
        self.shown = ""
        self.shown_logprobs = 0
        self._current = ""
        self._logprobs: list[dict[str, Any]] | None = None

    def _token(self, text: str, logprobs: list[dict[str, Any]] | None) -> Shown:
        return {"event": "token", "index": self.index, "text": text, "logprobs": logprobs}

    def _restart(self, attempt: str) -> list[Shown]:
        self.shown, self.shown_logprobs = self._current, len(self._logprobs or [])
        restart: Shown = {"event": "restart", "index": self.index, "attempt": attempt}
        whole = [self._token(self._current, self._logprobs)] if self._current or self._logprobs else []
        return [restart, *whole]

    def _catch_up(self, attempt: str) -> list[Shown]:
        if self._current != self.shown and self.shown.startswith(self._current):
            return []  # retracing what the reader already has
        if not self._current.startswith(self.shown):
            return self._restart(attempt)
        piece, self.shown = self._current[len(self.shown):], self._current
        logprobs = None
        if self._logprobs is not None:
            logprobs, self.shown_logprobs = self._logprobs[self.shown_logprobs:], max(
                self.shown_logprobs, len(self._logprobs))
        return [self._token(piece, logprobs)] if piece or logprobs else []

    def start(self) -> None:
        """A new attempt begins: its text is built up from nothing."""
        self._current, self._logprobs = "", None

    def feed(self, event: dict[str, str]) -> list[Shown]:
        kind = event["event"]
        if kind == "start":
            self.start()
            return []
        if kind == "token":
            self._current += event["text"]
            if "logprobs" in event:
                self._logprobs = (self._logprobs or []) + json.loads(event["logprobs"])
            return self._catch_up(event.get("attempt", ""))
        if kind == "end":
            return [*self.finish(event.get("attempt", "")), event]
        return [event]

    def finish(self, attempt: str) -> list[Shown]:
        """The attempt ended: a restart if its text stops short of what was shown, or departs from it."""
        if self._current != self.shown:
            return self._restart(attempt)
        return []


class ChoicesFollower:
    """What a reader of one job's stream has been shown: a ``TextFollower`` per choice."""

    def __init__(self) -> None:
        self.choices: dict[int, TextFollower] = {}

    def choice(self, index: int) -> TextFollower:
        if index not in self.choices:
            self.choices[index] = TextFollower(index)
        return self.choices[index]

    def feed(self, event: dict[str, str]) -> list[Shown]:
        kind = event["event"]
        if kind == "start":
            for follower in self.choices.values():
                follower.start()
            return []
        if kind == "token":
            return self.choice(int(event.get("index") or 0)).feed(event)
        if kind == "end":
            attempt = event.get("attempt", "")
            return [*(e for i in sorted(self.choices) for e in self.choices[i].finish(attempt)), event]
        return [event]


def follow_text(r: redis.Redis, job_id: str, timeout_s: float = 60.0,
                ended: Callable[[], bool] | None = None) -> Iterator[Shown]:
    """``follow``, as a reader should see it: each choice's text once, ``restart`` when an attempt departs."""
    follower = ChoicesFollower()
    for event in follow(r, job_id, timeout_s, ended):
        yield from follower.feed(event)
