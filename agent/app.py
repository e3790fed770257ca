"""The agent's Celery application: ``celery -A agent worker -Q agent -B``.

Beat sends ``agent.tick`` every ``LLAMAS_AGENT_INTERVAL_S`` (and, with a chat
room configured, ``agent.chat_poll`` every ``LLAMAS_AGENT_CHAT_INTERVAL_S``);
the herder forwards each response to ``agent.inference_response`` or
``agent.chat_response`` on the agent's own queue. The tasks are thin: they
decode, call ``Trader`` or ``ChatBot``, and log.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any

import redis
import sqlalchemy.exc
from celery import Celery, Task
from celery.signals import worker_init

from agent.chatbot import ChatBot
from agent.constants import CHAT_POLL_TASK, CHAT_RESPONSE_TASK, RESPONSE_TASK, TICK_TASK
from agent.errors import AgentError
from agent.exchange import open_paper as open_exchange
from agent.grading import method, shipped_calibration
from agent.settings import AgentSettings, get_settings
from agent.store import OutcomeStore
from agent.strategy import refusal_reason
from agent.trader import Trader, is_transient
from agent.world import World, check_room

log = logging.getLogger("agent")

_settings = get_settings()
app = Celery("agent")
app.config_from_object("celeryconfig")
app.conf.broker_url = app.conf.result_backend = _settings.redis_url
app.conf.task_default_queue = _settings.agent_queue
app.conf.task_routes = {"agent.*": {"queue": _settings.agent_queue}}
app.conf.beat_schedule_filename = str(_settings.beat_schedule_file)
# A beat that waited longer than its period is stale: the next one covers it.
app.conf.beat_schedule = {
    "agent-tick": {"task": TICK_TASK, "schedule": _settings.agent_interval_s,
                   "options": {"expires": max(1.0, _settings.agent_interval_s)}},
}
if _settings.agent_chat_room:
    app.conf.beat_schedule["agent-chat"] = {
        "task": CHAT_POLL_TASK, "schedule": _settings.agent_chat_interval_s,
        "options": {"expires": max(1.0, _settings.agent_chat_interval_s)},
    }


@dataclass
class Context:
    """What one agent process opens once: the trader and, if configured, the chatbot."""

    trader: Trader
    chatbot: ChatBot | None


_context: Context | None = None


def build(settings: AgentSettings) -> Context:
    """Open everything the agent's tasks need, from ``settings``."""
    from router.client import Herder

    r = redis.Redis.from_url(settings.redis_url)
    herder = Herder(settings.agent_api_key, redis_url=settings.redis_url)
    grading = method(settings.agent_method)
    trader = Trader(settings, herder, World(r), OutcomeStore.open(settings.database_url),
                    open_exchange(settings), grading, shipped_calibration(settings.agent_model, grading.name))
    chatbot = ChatBot(settings, herder, r) if settings.agent_chat_room else None
    return Context(trader, chatbot)


def context() -> Context:
    """This process's context, opened on first use (in the child, after the fork)."""
    global _context
    if _context is None:
        _context = build(_settings)
    return _context


def check(settings: AgentSettings) -> None:
    """Refuse to start, with the reason, when the agent could not work."""
    if not settings.agent_api_key:
        raise AgentError("LLAMAS_AGENT_API_KEY is not set (create an account: llamas accounts create agent)")
    check_room(settings.agent_room)
    if settings.agent_chat_room:
        check_room(settings.agent_chat_room)
    method(settings.agent_method)
    # Create the tables and open the paper account once, before the children fork.
    OutcomeStore.open(settings.database_url).close()
    open_exchange(settings).close()


@worker_init.connect
def _check_before_fork(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "app", None) is not app:
        return
    try:
        check(_settings)
    except (AgentError, sqlalchemy.exc.SQLAlchemyError) as exc:
        print(f"llamas agent refuses to start: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    grading = method(_settings.agent_method)
    if grading.scores_probabilities and shipped_calibration(_settings.agent_model, grading.name) is None:
        log.warning("agent: no calibration for model %s and method %s; grading uncalibrated "
                    "(measure it with llamas agent accuracy --refit)", _settings.agent_model, grading.name)
    chat = _settings.agent_chat_room
    log.info("agent: room %s every %ss, method %s, queue %s%s", _settings.agent_room, _settings.agent_interval_s,
             _settings.agent_method, _settings.agent_queue,
             f", chatbot {_settings.agent_chat_nick} in {chat}" if chat else "")


# A database that is briefly unreachable must not lose a response: retry it.
_DB_RETRY = dict(autoretry_for=(sqlalchemy.exc.OperationalError,), retry_backoff=True, max_retries=5)


@app.task(name=TICK_TASK, bind=True, acks_late=True, ignore_result=True)
def tick(self: Task) -> None:
    """One beat of the agent; the task id is the tick id, stable across redelivery."""
    try:
        context().trader.tick(self.request.id)
    except Exception as exc:
        if not is_transient(exc):
            raise
        # The tick stays recorded as submitting; the next beat resubmits it under its reference.
        log.warning("TICK     herder unreachable (%s); the next tick retries", refusal_reason(exc))


@app.task(name=RESPONSE_TASK, acks_late=True, ignore_result=True, **_DB_RETRY)
def inference_response(response: Any) -> None:
    """Inference-Response from the herder: grade, then buy or skip."""
    if not isinstance(response, dict):
        log.warning("RESPONSE ignored: not a response document")
        return
    context().trader.on_response(response)


@app.task(name=CHAT_POLL_TASK, acks_late=True, ignore_result=True)
def chat_poll() -> None:
    """The chatbot's look at its room."""
    bot = context().chatbot
    if bot is None:
        return
    try:
        bot.poll()
    except Exception as exc:
        if not is_transient(exc):
            raise
        log.warning("CHAT     herder unreachable (%s); will look again", refusal_reason(exc))


@app.task(name=CHAT_RESPONSE_TASK, acks_late=True, ignore_result=True)
def chat_response(response: Any) -> None:
    """The herder's response to a chatbot request: post the reply once."""
    bot = context().chatbot
    if bot is None or not isinstance(response, dict):
        log.warning("CHAT     response ignored: no chatbot here, or not a response document")
        return
    bot.on_response(response)
