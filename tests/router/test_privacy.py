"""What an operator sees of a request (logs, task events as Flower shows them): ids and sizes, no text."""

from __future__ import annotations

import json
import logging
import uuid
from types import SimpleNamespace
from typing import Any

import pytest
from billiard.einfo import ExceptionInfo
from celery import states
from celery.app import trace
from celery.app.task import Context
from celery.contrib.testing.mocks import TaskMessage
from celery.utils.saferepr import saferepr

from llama_tasks import app as worker_app
from llama_tasks import redact
from router import app
from router.core.settings import HERDER_QUEUE
from tests.events import captured_events, text_forms
from tests.processes import wait_for
from tests.router.requester_app import RECEIVED_KEY
from tests.stack import running_stack


@pytest.fixture(scope="module")
def sqlite_stack(tmp_path_factory, redis_url):
    yield from running_stack("sqlite", tmp_path_factory)


def _submit(api_key: str, request: dict[str, Any]) -> Any:
    """A submit as any broker client sends it, the API key kept out of the message's repr."""
    return app.send_task("router.submit", args=[api_key, request], queue=HERDER_QUEUE, argsrepr="(…)")


@pytest.mark.slow
def test_the_herder_keeps_prompts_and_completions_out_of_its_log_and_the_events(sqlite_stack):
    stack = sqlite_stack
    key, herder = stack.account(100_000)
    secret = f"okapi{uuid.uuid4().hex[:12]}"
    with captured_events(app) as events:
        handle = herder.run(f"Repeat after me: {secret} {secret}.", 24,
                            callback=("requester.inference_response", "requester"))
        response = handle.result(timeout=60)
        handle.status()  # the status document holds the response text too
        # Refusals whose messages or exceptions would quote the request.
        refusals = [
            _submit(key, {"prompt": "Hello", "max_tokens": 4, "stop": ["never " + secret * 5]}),
            _submit(key, {"prompt": f"{secret} \ud800", "max_tokens": 4}),
        ]
        for refused in refusals:
            refused.get(timeout=60, propagate=False)
            assert refused.state == "FAILURE"
        # The callback reaches the requester's own worker (another process): polled.
        wait_for(lambda: handle.id in b"".join(stack.r.lrange(RECEIVED_KEY, 0, -1)).decode(), 30,
                 "the requester's callback")
        task_id = stack.job(handle.id).task_id
        events.wait_for_tasks({("task-succeeded", task_id)} | {("task-failed", r.id) for r in refusals})
        events.wait(lambda _: bool(events.named("requester.inference_response")), "event for the callback")
    completion = response["text"].strip()
    assert len(completion) >= 20, response  # long enough not to turn up by chance
    shown = json.dumps(events.events, ensure_ascii=False)
    places = {"herder log": stack.herder.output(), "worker log": stack.worker.output(), "events": shown}
    for place, text in places.items():
        for form in text_forms(secret) + text_forms(completion):
            assert form not in text, f"{form!r} appears in the {place}"
    # Ids and counts are still there to operate by.
    sent = [e for e in events.events if e.get("type") == "task-sent" and e.get("uuid") == task_id]
    assert sent and handle.id in sent[0]["args"]
    callback = events.named("requester.inference_response")
    assert handle.id in callback[0]["args"]
    assert "router.settle" in places["herder log"] and "raised expected" in places["herder log"]


# --- the parts, without processes ----------------------------------------------


def test_a_private_request_shows_ids_and_sizes_but_hands_the_task_everything(make_job):
    secret = f"tapir{uuid.uuid4().hex[:12]}"
    envelope, job = make_job(prompt=f"Tell me about {secret}.", stop=[secret])
    sent: list[dict[str, Any]] = []
    eventer = SimpleNamespace(enabled=True, send=lambda type, **fields: sent.append({"type": type, **fields}))
    message = TaskMessage("llama_tasks.generate", args=[envelope], argsrepr=saferepr([envelope]))
    request = redact.PrivateRequest(message, app=worker_app, eventer=eventer,
                                    task=worker_app.tasks["llama_tasks.generate"])
    request.send_event("task-succeeded", result=saferepr({"job_id": job.job_id, "text": secret}), runtime=0.1)
    request.send_event("task-failed", exception=f"BadStop({secret!r})", traceback=f"Traceback: {secret}")
    shown = json.dumps([request.argsrepr, request.kwargsrepr, request.request_dict["argsrepr"], repr(request),
                        request.info(), request.info(safe=False), sent], default=str)
    assert secret not in shown
    assert job.job_id in request.argsrepr and sent[1]["exception"] == "BadStop"
    assert request.args == [envelope]  # the task itself still runs on the real envelope


def test_celerys_outcome_lines_carry_no_text(caplog):
    secret = f"tapir{uuid.uuid4().hex[:12]}"
    task = app.tasks["router.submit"]
    request = Context(id="t-1", hostname="herder@test", args=["key", {"prompt": secret}], kwargs={})
    with caplog.at_level(logging.INFO, logger="celery.app.trace"):
        trace.info(trace.LOG_SUCCESS, {"id": "t-1", "name": task.name, "runtime": 0.1,
                                       "return_value": saferepr({"text": secret}), "args": "", "kwargs": ""})
        try:
            f"{secret} \ud800".encode()
        except UnicodeEncodeError:  # unexpected: logged with its traceback, its repr quotes the prompt
            trace.TraceInfo(states.FAILURE)._log_error(task, request, ExceptionInfo())
    assert secret not in caplog.text
    succeeded, failed = caplog.records[-2:]
    assert "succeeded in" in succeeded.getMessage() and "chars hidden" in succeeded.getMessage()
    assert failed.getMessage().endswith("raised unexpected: UnicodeEncodeError")
    assert "test_privacy.py" in caplog.text and "UnicodeEncodeError" in caplog.text  # the frames remain
