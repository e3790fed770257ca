"""The Python client: ``from router import Herder``.

It talks to the herder through the broker (a message to the ``herder``
queue, answered through the result backend), so a requester needs a broker
URL and an API key — never the ledger. Refusals arrive as the typed errors
of ``router.core.errors`` and ``llama_tasks.errors``.
"""

from __future__ import annotations

import functools
import json
import time
import uuid
from collections.abc import Iterator
from typing import Any, cast

import redis
from celery import Celery
from celery.exceptions import TaskRevokedError
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu import Exchange, Queue
from kombu.exceptions import OperationalError as BrokerUnreachable

from llama_tasks import redact
from llama_tasks import stream as token_stream
from llama_tasks.embedding_job import as_inputs, decode_vector
from llama_tasks.job import DEFAULT_MAX_TOKENS
from llama_tasks.registry import DEFAULT_MODEL
from router.core import fees, request
from router.core.errors import JobFailed, ResultTimeout, StreamRestarted
from router.core.keys import NOTIFY_PREFIX, RESPONSE_PREFIX
from router.core.request import Submission
from router.core.settings import HERDER_QUEUE

#: How often ``result()`` asks the herder directly, in case a response key was lost.
STATUS_POLL_S = 5.0
#: Default time to wait for the herder to answer a request.
RPC_TIMEOUT_S = 30.0

#: How a call fails when no herder answered it: the wait ran out; the message
#: expired in the queue while no herder ran (a herder that starts later
#: discards it as revoked); the broker could not be reached. None of these is
#: an answer, so the call may be sent again; a herder's refusal is, and
#: arrives as a ``LlamasError`` subclass.
UNANSWERED: tuple[type[Exception], ...] = (
    CeleryTimeout, TaskRevokedError, BrokerUnreachable, redis.ConnectionError, redis.TimeoutError,
)


@functools.cache
def requester_app(redis_url: str | None = None) -> Celery:
    """A plain Celery app on the shared configuration, for sending to the herder.

    Not the herder's own app: a requester needs the broker and the result
    backend, not the herder's tasks, schedule and start-up checks.
    ``redis_url`` (default ``LLAMAS_REDIS_URL``) is the broker and result
    store, such as the URL ``llamas broker client`` gives.
    """
    app = Celery("llamas-requester")
    app.config_from_object("celeryconfig")
    if redis_url:
        app.conf.broker_url = app.conf.result_backend = redis_url
    # The herder binds its queue; a requester's broker user may not
    # (router.core.broker_access), and need not.
    app.conf.task_queues = [Queue(HERDER_QUEUE, Exchange(HERDER_QUEUE), routing_key=HERDER_QUEUE, no_declare=True)]
    return app


def new_reference() -> str:
    """A reference for a submit its caller gave none: unique per account (admission's scope) by chance alone."""
    return uuid.uuid4().hex


def read_handle(r: redis.Redis, job_id: str, wait_s: float) -> dict[str, Any] | None:
    """The response for a job if written, waiting up to ``wait_s`` for it."""
    raw = r.get(RESPONSE_PREFIX + job_id)
    if raw is None and wait_s > 0:
        r.blpop([NOTIFY_PREFIX + job_id], timeout=max(1, int(wait_s)))
        raw = r.get(RESPONSE_PREFIX + job_id)
    return json.loads(raw) if raw else None


class Herder:
    """A requester's connection to the service."""

    def __init__(self, api_key: str = "", app: Celery | None = None, redis_url: str | None = None,
                 timeout_s: float = RPC_TIMEOUT_S) -> None:
        if app is None:
            app = requester_app(redis_url)
        self.app = app
        self.api_key = api_key
        self.timeout_s = timeout_s
        self.redis = redis.Redis.from_url(redis_url or str(app.conf.broker_url))

    def _call(self, task: str, *args: Any, secret: bool = False, retry: bool = True, **kwargs: Any) -> Any:
        """Ask the herder; a call no herder answered in time is sent once more if ``retry``.

        Every call expires with its wait: a herder killed holding it leaves
        the message unacknowledged, and when Redis hands it back (after its
        visibility timeout) nobody is waiting, so it must not run then.
        Only calls that are safe to repeat retry (reads, cancels, and
        submits, which always carry a ``reference``).
        """
        try:
            return self._send(task, args, kwargs, secret)
        except UNANSWERED:
            if not retry:
                raise
            return self._send(task, args, kwargs, secret)

    def _send(self, task: str, args: tuple[Any, ...], kwargs: dict[str, Any], secret: bool) -> Any:
        # What events (Flower) and logs show of the call: ids and sizes, never
        # the API key (the first argument of secret calls) or a prompt.
        shown = args[1:] if secret else args
        result = self.app.send_task(task, args=args, kwargs=kwargs, queue=HERDER_QUEUE, expires=self.timeout_s,
                                    argsrepr=redact.describe(list(shown)), kwargsrepr=redact.describe(kwargs))
        try:
            # The herder's own workers answer, never the caller's: waiting from
            # inside a requester's Celery task (as the agent does) cannot deadlock.
            return result.get(timeout=self.timeout_s, disable_sync_subtasks=False)
        finally:
            result.forget()

    # --- prices ---------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        return self._call("router.info")

    def prices(self) -> tuple[int, int]:
        """``(base_fee, fee_per_token)``, as the original client's getPrices."""
        info = self.info()
        return info["base_fee"], info["fee_per_token"]

    def calculate_fee(self, prompt_tokens: int, tokens: int, multiplier: float = 1.0, n: int = 1) -> int:
        """The fee for a prompt of known length and ``n`` completions, computed here from the herder's prices."""
        base, per = self.prices()
        return fees.offer(fees.quote(base, per, prompt_tokens, tokens, n), None, multiplier)

    def quote(self, prompt: str | None = None, tokens: int = DEFAULT_MAX_TOKENS, *,
              messages: list[dict[str, Any]] | None = None, model: str = DEFAULT_MODEL,
              n: int = 1, tools: list[dict[str, Any]] | None = None,
              tool_choice: str | dict[str, Any] | None = None) -> dict[str, Any]:
        sub = Submission(prompt=prompt, messages=messages, max_tokens=tokens, model=model, n=n, tools=tools,
                         tool_choice=tool_choice)
        request.check(sub)
        return self._call("router.quote", sub.to_dict())

    # --- requests -------------------------------------------------------------

    def run(self, prompt: str | None = None, tokens: int = DEFAULT_MAX_TOKENS, *,
            messages: list[dict[str, Any]] | None = None,
            fee: int | None = None, multiplier: float | None = None, bump: bool = False,
            reference: str | None = None, callback: str | tuple[str, str] | None = None,
            webhook: str | None = None, deadline_s: float | None = None, stop: str | list[str] | None = None,
            grammar: str | None = None, json_schema: dict[str, Any] | None = None,
            model: str = DEFAULT_MODEL, n: int = 1, logprobs: bool = False, top_logprobs: int = 0,
            tools: list[dict[str, Any]] | None = None, tool_choice: str | dict[str, Any] | None = None,
            parallel_tool_calls: bool = True, **sampling: Any) -> JobHandle:
        """Pay for one generation; returns its handle at once.

        ``n`` asks for that many completions of the prompt (the quote covers
        ``n × tokens``; each is charged for what it used); ``logprobs`` for each
        generated token's log probability, with ``top_logprobs`` alternatives.
        The response's ``choices`` lists them all (``text`` is the first's) and
        ``cached_tokens`` counts prompt tokens a worker had cached (charged at
        ``fee_per_cached_token``). Every choice streams: ``stream(choice=i)``.
        ``stop`` is one stop string or a list of them. ``sampling`` takes
        ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repeat_penalty`` and
        ``seed``. ``tools`` offers function tools to a chat (OpenAI's
        ``[{"type": "function", "function": {name, description, parameters}}]``),
        ``tool_choice`` is ``auto`` (default), ``none``, ``required`` or
        ``{"type": "function", "function": {"name": …}}``; ``messages`` may carry
        assistant ``tool_calls`` and ``tool`` results (``tool_call_id``). The
        response's choices then carry ``tool_calls`` (OpenAI's shape, arguments
        valid against their schema) and ``content``, and ``finish_reason``
        ``tool_calls``. ``callback`` is a Celery task name, or ``(task, queue)``, that
        receives the response with its ``reference``. Without a ``reference``
        the client makes one (``new_reference``), so that a submit whose
        answer was lost is sent again safely: the herder returns the job
        the first one admitted instead of holding the offer twice. With ``bump`` and no
        explicit offer, the bid matches the last accepted multiplier when the
        queue is not empty, so the request does not go to the back of a busy
        queue. A request that cannot be right (a wrong type, a value out of
        range, text that is not valid Unicode) raises its typed error here,
        before anything is sent.
        """
        task, queue = (callback, None) if isinstance(callback, str) or callback is None else callback
        sub = Submission.from_dict({
            "prompt": prompt, "messages": messages, "max_tokens": tokens, "model": model,
            "stop": stop, "grammar": grammar, "json_schema": json_schema,
            "fee": fee, "multiplier": multiplier, "reference": new_reference() if reference is None else reference,
            "callback_task": task, "callback_queue": queue, "webhook_url": webhook,
            "deadline_s": deadline_s, "n": n, "logprobs": logprobs, "top_logprobs": top_logprobs,
            "tools": tools, "tool_choice": tool_choice, "parallel_tool_calls": parallel_tool_calls, **sampling,
        })
        request.check(sub)
        if bump and fee is None and multiplier is None:
            info = self.info()
            if info["queue_length"] and info["last_multiplier"]:
                sub.multiplier = max(1.0, info["last_multiplier"])
        # Repeated if unanswered: the reference makes the herder return the
        # job the first one admitted instead of holding the offer twice.
        doc = self._call("router.submit", self.api_key, sub.to_dict(), secret=True)
        return JobHandle(self, doc)

    def embed(self, input: str | list[str] | list[int] | list[list[int]], *, model: str = DEFAULT_MODEL,
              fee: int | None = None, multiplier: float | None = None, reference: str | None = None,
              deadline_s: float | None = None, dimensions: int | None = None,
              timeout: float = 300.0) -> dict[str, Any]:
        """Pay for the embeddings of ``input`` and wait for them (up to ``timeout`` s).

        ``input`` is a text, a list of texts, a token array or a list of token
        arrays, as OpenAI's. Returns the response document with
        ``embeddings``: one vector (a list of floats, unit L2 norm) per input,
        in input order, beside ``prompt_tokens`` (the input tokens charged),
        ``charged`` and ``refunded``. Quoted as ``base_fee +
        fee_per_embedding_token × input tokens`` and charged exactly that
        times the multiplier. ``dimensions`` is accepted only at the model's
        own size. Raises ``JobFailed`` if the job did not complete, and a
        bad request's typed error before anything is sent.
        """
        sub = Submission.from_dict({
            "input": as_inputs(input), "model": model, "dimensions": dimensions, "fee": fee,
            "multiplier": multiplier, "reference": new_reference() if reference is None else reference,
            "deadline_s": deadline_s,
        })
        request.check(sub)
        doc = self._call("router.submit", self.api_key, sub.to_dict(), secret=True)
        response = JobHandle(self, doc).result(timeout)
        return response | {"embeddings": [decode_vector(c["embedding"]) for c in response["choices"]]}

    def embedding_quote(self, input: str | list[str] | list[int] | list[list[int]], *,
                        model: str = DEFAULT_MODEL) -> dict[str, Any]:
        """What embedding ``input`` would cost: its input tokens and the quote, counted as admission counts them."""
        sub = Submission(input=as_inputs(input), model=model)  # type: ignore[arg-type]
        request.check(sub)
        return self._call("router.quote", sub.to_dict())

    def jobs(self, limit: int = 20) -> list[dict[str, Any]]:
        """Your most recent jobs, newest first."""
        return self._call("router.jobs", self.api_key, limit, secret=True)

    def job(self, job_id: str) -> JobHandle:
        return JobHandle(self, self._call("router.status", self.api_key, job_id, secret=True))

    def receipt(self, job_id: str) -> dict[str, Any]:
        """The herder's signed receipt of one of your ended jobs (check it with ``router.core.receipts.verify``)."""
        return self._call("router.receipt", self.api_key, job_id, secret=True)


class JobHandle:
    """One admitted job, as its requester sees it."""

    def __init__(self, herder: Herder, doc: dict[str, Any]) -> None:
        self._herder = herder
        self.doc = doc
        self.id: str = doc["job_id"]

    def __repr__(self) -> str:
        return f"JobHandle({self.id}, {self.doc.get('state')})"

    def status(self) -> str:
        self.doc = self._herder._call("router.status", self._herder.api_key, self.id, secret=True)
        return str(self.doc["state"])

    def position(self) -> int:
        """1-based place in the queue; 0 once the job has left it."""
        self.status()
        return int(self.doc["position"])

    def receipt(self) -> dict[str, Any]:
        """The herder's signed receipt of this job once it has ended (``JobNotFinished`` before)."""
        return self._herder.receipt(self.id)

    def cancel(self) -> dict[str, Any]:
        self.doc = self._herder._call("router.cancel", self._herder.api_key, self.id, secret=True)
        return self.doc

    def raise_bid(self, fee: int | None = None, multiplier: float | None = None) -> dict[str, Any]:
        self.doc = self._herder._call("router.raise_bid", self._herder.api_key, self.id, fee, multiplier, secret=True,
                                      retry=False)
        return self.doc

    def response(self, timeout: float = 300.0) -> dict[str, Any]:
        """The final response document (whatever the outcome), waiting up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        next_poll = time.monotonic() + STATUS_POLL_S
        while True:
            remaining = deadline - time.monotonic()
            found = read_handle(self._herder.redis, self.id, min(1.0, max(0.0, remaining)))
            if found is not None:
                return found
            if time.monotonic() >= next_poll or remaining <= 0:
                # The response key may have been lost (Redis flushed): ask the herder.
                polled = self._poll()
                if polled is not None and "response" in polled:
                    return cast(dict[str, Any], polled["response"])
                next_poll = time.monotonic() + STATUS_POLL_S
            if remaining <= 0:
                raise ResultTimeout(self.id, timeout)

    def _poll(self) -> dict[str, Any] | None:
        """The job's status, or None when no herder answered (down, restarting, or one died holding the poll).

        Sent once: the next poll is the retry. A herder's refusal still raises.
        """
        try:
            self.doc = self._herder._call("router.status", self._herder.api_key, self.id, secret=True, retry=False)
        except UNANSWERED:
            return None
        return self.doc

    def result(self, timeout: float = 300.0) -> dict[str, Any]:
        """The answer (text, choices, tokens, cached tokens, charged, refunded, finish reason, timings); raises if none."""
        response = self.response(timeout)
        if response["status"] != "done":
            raise JobFailed(self.id, response["status"], response.get("error"), response.get("message"))
        return response

    def stream(self, timeout: float = 300.0, choice: int = 0) -> Iterator[str]:
        """Text pieces of one choice (the first unless ``choice`` says) as the worker generates them, each once.

        When a worker is lost mid-job the attempt that runs again retraces the
        same text silently (each job samples with its own fixed seed). Should it
        write different text, ``StreamRestarted`` is raised: discard what was
        shown, then call ``stream()`` again or ``result()``.
        """
        r = self._herder.redis
        ended = False
        for event in token_stream.follow_text(r, self.id, timeout_s=timeout,
                                              ended=lambda: bool(r.exists(RESPONSE_PREFIX + self.id))):
            if event["event"] in ("token", "restart") and event["index"] != choice:
                continue
            if event["event"] == "token":
                if event["text"]:
                    yield event["text"]
            elif event["event"] == "restart":
                raise StreamRestarted(self.id, int(event["attempt"] or 0))
            elif event["event"] == "error":
                raise JobFailed(self.id, "failed", event.get("error"), event.get("message"))
            elif event["event"] == "end":
                ended = True
        if not ended:
            # The job ended without streaming (expired or cancelled while queued): say how.
            self.result(timeout)
