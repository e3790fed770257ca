"""What the admin and operators see of a task: ids, numbers and sizes, never requesters' text.

Prompts, messages and completions travel in task arguments and results, and
Celery shows those in three places the admin (or an operator running a worker)
reads: the worker log (the
``succeeded``/``raised`` lines of ``celery.app.trace``), task events (Flower's
task list: ``task-received`` args, ``task-succeeded`` result, ``task-failed``
exception and traceback) and remote control (``inspect active``). Tasks that
carry text use ``PrivateRequest`` and processes that run them call
``install_log_filter``; the result backend keeps the real values.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import traceback
from typing import Any

from celery.worker.request import Request

from llama_tasks.errors import LlamasError

#: Keys whose scalar values are ids, names, states or counts: shown as they are.
#: Anything else (prompts, messages, completions, stop strings, grammars,
#: references, URLs, API keys) is shown only as a size.
SHOWN_KEYS = frozenset({
    "job_id", "task_id", "attempt", "model", "model_id", "worker", "pid", "load_count",
    "state", "status", "finish_reason", "error", "max_tokens", "prompt_tokens",
    "completion_tokens", "charged", "refunded", "offered", "quote", "multiplier",
    "position", "retries", "key_id", "n_ctx", "cap", "limit", "needed",
})
#: Keys holding requester documents: not looked into, so keys inside them
#: that happen to be named like ours show nothing.
OPAQUE_KEYS = frozenset({"json_schema", "messages", "response_format", "tools", "grammar"})
#: Longest string shown for a key of ``SHOWN_KEYS``: ids and names are short.
MAX_SHOWN_CHARS = 80
#: How deep ``describe`` looks into nested documents.
MAX_DEPTH = 6

_TRACE_LOGGER = "celery.app.trace"
_LEADING_NAME = re.compile(r"[A-Za-z_][\w.]*")


def _collect(value: Any, key: str | None, facts: dict[str, Any], depth: int) -> None:
    if depth > MAX_DEPTH or key in OPAQUE_KEYS:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            if isinstance(k, str):
                _collect(v, k, facts, depth + 1)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _collect(item, None, facts, depth + 1)
    elif key in SHOWN_KEYS and key not in facts:
        if value is None or isinstance(value, (bool, int, float)):
            facts[key] = value
        elif isinstance(value, str) and len(value) <= MAX_SHOWN_CHARS and value.isprintable():
            facts[key] = value


def _size(value: Any) -> int:
    try:
        return len(json.dumps(value, ensure_ascii=False, default=str))
    except (TypeError, ValueError):  # circular, or keys JSON cannot take
        return len(repr(value))


def describe(value: Any) -> str:
    """The ids and counts found in ``value`` and its size, e.g. ``<job_id='ab' attempt=1; 812 chars>``."""
    facts: dict[str, Any] = {}
    _collect(value, None, facts, 0)
    shown = " ".join(f"{k}={v!r}" for k, v in facts.items())
    return f"<{shown}; {_size(value)} chars>" if shown else f"<{_size(value)} chars>"


def describe_error(exc: BaseException) -> str:
    """An exception's type with its numeric and id fields; its message may quote a request."""
    name = type(exc).__name__
    if not isinstance(exc, LlamasError):
        return name
    shown = {}
    for field, value in exc.as_dict().items():
        if isinstance(value, (bool, int, float)) or (
            field in SHOWN_KEYS and isinstance(value, str) and len(value) <= MAX_SHOWN_CHARS
        ):
            shown[field] = value
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in shown.items())})" if shown else name


def hidden(text: Any) -> str:
    """What is shown instead of a value Celery has already turned into text."""
    return f"<{len(text) if isinstance(text, str) else _size(text)} chars hidden>"


def traceback_text(exc: BaseException) -> str:
    """A traceback with every frame but no exception messages (they may quote a request)."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    parts: list[str] = []
    for link in reversed(chain):
        if parts:
            parts.append("\nDuring the handling of it, or caused by it:\n\n")
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_tb(link.__traceback__))
        parts.append(describe_error(link) + "\n")
    return "".join(parts).rstrip("\n")


def _error_name(exc_repr: Any) -> str:
    """The type name at the start of an exception's repr (all Celery hands over for expected errors)."""
    found = _LEADING_NAME.match(exc_repr) if isinstance(exc_repr, str) else None
    return found.group(0) if found else "error"


class TraceLogFilter(logging.Filter):
    """Rewrites Celery's task outcome log lines so they carry no arguments, results or messages."""

    def filter(self, record: logging.LogRecord) -> bool:
        data = getattr(record, "data", None)
        if isinstance(data, dict):
            # ``data`` is also the record's format mapping: rewriting it
            # rewrites the line and what custom handlers receive.
            if "return_value" in data:
                data["return_value"] = hidden(data["return_value"])
            if "exc" in data:
                data["exc"] = _error_name(data["exc"])
            if "traceback" in data:
                data["traceback"] = ""
            for key in ("args", "kwargs"):
                if key in data:
                    data[key] = hidden(data[key])
        if record.exc_info and isinstance(record.exc_info, tuple) and record.exc_info[1] is not None:
            record.exc_text = traceback_text(record.exc_info[1])
            record.exc_info = None
        return True


def install_log_filter() -> None:
    """Make this process's Celery task log lines private (idempotent)."""
    logger = logging.getLogger(_TRACE_LOGGER)
    if not any(isinstance(f, TraceLogFilter) for f in logger.filters):
        logger.addFilter(TraceLogFilter())


def _named_arguments(task: Any, args: Any, kwargs: Any) -> dict[str, Any]:
    """Arguments by parameter name, so ``describe`` knows an ``api_key`` from a ``job_id``."""
    positional = list(args) if isinstance(args, (list, tuple)) else [args]
    named = dict(kwargs) if isinstance(kwargs, dict) else {}
    try:
        bound = inspect.signature(task.run).bind_partial(*positional, **named)
    except (TypeError, ValueError):  # a message that does not fit the task: show sizes only
        return {f"arg{i}": value for i, value in enumerate(positional)} | {
            str(k): v for k, v in named.items()
        }
    return dict(bound.arguments)


class PrivateRequest(Request):
    """A task request whose events, log context and remote-control view hold no requester text.

    Use it as ``@app.task(Request=PRIVATE_REQUEST)``. The task itself still
    receives its real arguments, and its result is stored unchanged.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Whatever ``argsrepr`` the sender chose (Celery's default is the full
        # repr), what this worker shows is worked out from the arguments here.
        self._argsrepr = describe(_named_arguments(self._task, self._args, self._kwargs))
        self._kwargsrepr = "{}"
        # The child process reads these for its own log context.
        self._request_dict["argsrepr"] = self._argsrepr
        self._request_dict["kwargsrepr"] = self._kwargsrepr

    def send_event(self, type: str, **fields: Any) -> None:
        if "result" in fields:
            # The parent process only ever sees the result as Celery's repr of it.
            fields["result"] = hidden(fields["result"])
        if "exception" in fields:
            fields["exception"] = _error_name(fields["exception"])
        if "traceback" in fields:
            fields["traceback"] = ""
        super().send_event(type, **fields)

    def info(self, safe: bool = False) -> dict[str, Any]:
        # ``celery inspect active`` (and Flower's worker page) asks for the
        # raw arguments unless told otherwise.
        return super().info(safe=True)


#: The value for a task's ``Request`` option.
PRIVATE_REQUEST = f"{__name__}:{PrivateRequest.__name__}"
