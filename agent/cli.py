"""``llamas world …`` and ``llamas agent …``: chat rooms, the agent's outcomes and its accuracy.

Two typer apps that the ``llamas`` CLI mounts through the ``llamas.cli``
entry points this package declares (see ``pyproject.toml``): the service
never imports the agent by name. Every refusal is one red line and exit
status 1, never a traceback.
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import redis
import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import SQLAlchemyError

from agent import grading
from agent.settings import AgentSettings
from agent.world import World, parse_replay, replay
from llama_tasks.errors import LlamasError
from llama_tasks.settings import exit_on_invalid

world_app = typer.Typer(help="Chat rooms (the World): post, read, replay.", no_args_is_help=True)
agent_app = typer.Typer(help="The example agent: its outcomes and its grading accuracy.", no_args_is_help=True)

_out = Console(highlight=False, soft_wrap=True)
_err = Console(stderr=True, highlight=False)


def _fail(message: str) -> NoReturn:
    """Print one red line and leave with status 1."""
    _err.print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]", soft_wrap=True)
    raise typer.Exit(1)


def load_settings() -> AgentSettings:
    """This command's settings; invalid ones are one line naming each bad setting."""
    try:
        return AgentSettings()
    except ValidationError as exc:
        _fail(str(exit_on_invalid(exc).code).removeprefix("llamas: "))


@contextmanager
def _refusals(settings: AgentSettings) -> Iterator[None]:
    """Turn every expected failure into one line: refusals, Redis, databases, files."""
    try:
        yield
    except LlamasError as exc:
        _fail(str(exc))
    except redis.RedisError as exc:
        _fail(f"cannot use Redis at {settings.redis_url}: {exc}")
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        _fail(f"database: {str(cause).strip().splitlines()[0]}")
    except OSError as exc:
        _fail(f"{exc.strerror or exc}: {exc.filename}" if exc.filename else str(exc))


def _world(settings: AgentSettings) -> World:
    return World(redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5))


def _time(stamp: float) -> str:
    return datetime.datetime.fromtimestamp(stamp).strftime("%H:%M:%S")


# --- llamas world ------------------------------------------------------------------


@world_app.command("post")
def post(room: str = typer.Argument(..., help="Room to post to."),
         text: str = typer.Argument(..., help="What to say."),
         nick: str = typer.Option("you", "--nick", "-n", help="Your nickname.")) -> None:
    """Broadcast TEXT to ROOM as --nick."""
    settings = load_settings()
    with _refusals(settings):
        message = _world(settings).broadcast(room, nick, text)
    _out.print(f"{escape(room)} {message.id} <{escape(nick)}> {escape(text)}")


@world_app.command("history")
def history(room: str = typer.Argument(..., help="Room to read."),
            count: int = typer.Option(10, "--count", "-n", min=1, max=1000, help="How many messages.")) -> None:
    """Print the last messages of ROOM (ChatHistory), oldest first."""
    settings = load_settings()
    with _refusals(settings):
        messages = _world(settings).history(room, count)
    if not messages:
        _out.print(f"{escape(room)} is empty")
    for m in messages:
        _out.print(f"{_time(m.at)} <{escape(m.nick)}> {escape(m.text)}")


@world_app.command("replay")
def replay_file(
    file: Path | None = typer.Argument(None, help="Messages, one a line: JSON {nick, text} or 'nick: text'. "
                                           "Default: the shipped sample (positive, negative and mixed moods)."),
    room: str = typer.Option("", "--room", "-r", help="Room to play into (default: the agent's room)."),
    pace: float = typer.Option(2.0, "--pace", "-p", min=0.0, max=3600.0, help="Seconds between messages."),
) -> None:
    """Play a file of chat messages into a room, one every --pace seconds."""
    settings = load_settings()
    path = file or Path(grading.sample_path())
    target = room or settings.agent_room
    with _refusals(settings):
        # Parse it all first, so a bad line refuses before anything is posted.
        messages = list(parse_replay(path, path.read_text(encoding="utf-8").splitlines()))
        for m in replay(_world(settings), target, messages, pace):
            _out.print(f"{escape(target)} <{escape(m.nick)}> {escape(m.text)}")
    _out.print(f"played {len(messages)} messages into {escape(target)}")


# --- llamas agent ------------------------------------------------------------------


@agent_app.command("status")
def status(recent: int = typer.Option(5, "--recent", min=0, max=100, help="Latest ticks to list.")) -> None:
    """The agent's outcomes (Buy, Skip, Error, Requests), spend and position."""
    from agent.exchange import open_paper
    from agent.store import OutcomeStore
    from agent.trader import read_status

    settings = load_settings()
    with _refusals(settings):
        store, exchange = OutcomeStore.open(settings.database_url), open_paper(settings)
        try:
            now = read_status(store, exchange, settings.agent_exchange_account, recent)
            store_grades = {t.id: g.expected for t in now.recent if (g := store.grade_of(t.id)) is not None}
        finally:
            store.close()
            exchange.close()
    s, trade, quote = now.summary, settings.agent_trade_token, settings.agent_quote_token
    _out.print(f"agent     room {escape(settings.agent_room)} · method {settings.agent_method} · "
               f"exchange account {escape(settings.agent_exchange_account)}")
    _out.print(f"outcomes  Buy {s.buy} · Skip {s.skip} · Error {s.error} · Requests {s.requests}"
               + (f" ({s.in_flight} in flight)" if s.in_flight else ""))
    per_grade = f" · {s.cost_per_grade} per grade ({s.graded} graded)" if s.cost_per_grade is not None else ""
    _out.print(f"spend     {s.spend} paid to the herder for grades{per_grade}")
    _out.print(f"position  {now.balances.get(trade, 0)} {trade} · {now.balances.get(quote, 0)} {quote} "
               f"({s.spent_on_orders} {quote} spent on {s.buy} buys at {settings.agent_price} {quote}/{trade})")
    if s.duplicates:
        _out.print(f"ignored   {s.duplicates} duplicated responses")
    if now.recent:
        # Plain lines rather than a table: a reason is never wrapped or clipped to the terminal.
        _out.print("latest ticks")
        for t in now.recent:
            if t.state == "buy":
                detail = f"{t.received} {trade} for {t.spent} {quote}"
            else:
                detail = t.reason or (f"answer {t.answer!r}" if t.answer else "")
            exact = store_grades.get(t.id)
            grade = "-" if t.grade is None else f"{exact:.2f}" if exact is not None else str(t.grade)
            _out.print(f"  {_time(t.created_at)}  job {(t.job_id or '-')[:12]:12}  grade {grade}  "
                       f"{t.state:10}  {escape(detail)}")


@agent_app.command("accuracy")
def accuracy(
    method_name: str = typer.Option("", "--method", "-m",
                                    help="Grading method, or 'all' (default: the agent's, LLAMAS_AGENT_METHOD)."),
    file: Path | None = typer.Option(None, "--file", "-f",
                                        help="Your labelled rooms, one JSON object a line: "
                                             '{"label": "positive|negative|neutral", "messages": '
                                             '[{"nick": …, "text": …}, …]} (optional "room", "split").'),
    split: str = typer.Option("", "--split", "-s",
                              help="tune, heldout or all (default: heldout of the shipped rooms; all of --file)."),
    limit: int = typer.Option(0, "--limit", min=0, help="Only the first N rooms of each label (0 = all)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print every room's answer."),
    refit: bool = typer.Option(False, "--refit",
                               help="Fit each probability method's calibration on the tuning half of the shipped "
                                    "rooms first, print it and grade with it (tuning rooms leave-one-out)."),
) -> None:
    """Grade labelled rooms with the real model (in process): accuracy, buy decisions, confusion matrix."""
    from agent import accuracy as acc
    from agent import rooms as labelled

    settings = load_settings()
    if split not in ("", "all", *labelled.SPLITS):
        _fail(f"--split must be tune, heldout or all, got {split!r}")
    with _refusals(settings):
        name = method_name or settings.agent_method
        methods = list(grading.METHODS.values()) if name == "all" else [grading.method(name)]
        rooms = labelled.load_file(file) if file is not None else labelled.shipped()
        chosen = split or ("all" if file is not None else labelled.HELDOUT)
        if chosen != "all":
            rooms = [r for r in rooms if r.split == chosen]
        if limit:
            rooms = [r for label in labelled.LABELS for r in [x for x in rooms if x.label == label][:limit]]
        if not rooms:
            _fail(f"no rooms in split {chosen}")
        source = escape(str(file)) if file is not None else "the shipped rooms"
        _out.print(f"model {settings.agent_model}: {len(rooms)} labelled rooms ({chosen} of {source}), "
                   "greedy decoding")
        local = acc.load_model(settings.models_file, settings.agent_model)
        try:
            for m in methods:
                _measure(acc, local, m, rooms, verbose, labelled.shipped(labelled.TUNE) if refit else None,
                         0 if file is not None else sum(r.split == labelled.TUNE for r in rooms))
        finally:
            local.close()


def _measure(acc: Any, local: Any, method: grading.Method, rooms: list[Any], verbose: bool,
             tune: list[Any] | None, tuning_rooms: int) -> None:
    """Measure one method on ``rooms`` and print its summary and confusion matrix.

    A probability method is calibrated as the agent would calibrate it: with
    its shipped fitted map, else with its content-free prior measured here.
    With ``tune``, a map is fitted on those rooms instead. ``tuning_rooms``:
    how many of ``rooms`` the shipped map was fitted on.
    """
    answers: dict[str, dict[str, Any]] = {}

    def answer(request: grading.GradingRequest) -> dict[str, Any]:
        key = request.to_json()  # a tuning room graded again after the fit costs nothing
        if key not in answers:
            answers[key] = acc.generate(local, request)
        return answers[key]

    def show(room: Any, text: str, reading: grading.Reading | None) -> None:
        predicted = reading.label if reading is not None else acc.UNREADABLE
        mark = "[green]ok[/green]" if predicted == room.label else "[red]xx[/red]"
        grade = "" if reading is None else f"grade {reading.grade:.2f} "
        _out.print(f"  {mark} {escape(room.room):8} {room.label:8} → {predicted:10} {grade}{escape(repr(text.strip()))}")

    prior = acc.measure_prior(method, answer)
    calibration: Any = prior
    held_out_of = None
    if prior is not None:
        _out.print(f"{method.name}: content-free prior "
                   + ", ".join(f"{label} {p:.4f}" for label, p in prior.items()))
        shipped = grading.shipped_affine(local.name, method.name)
        if tune is not None:
            calibration, held_out_of = acc.refit(method, tune, answer)
            _out.print(f"{method.name}: calibration fitted on {len(tune)} tuning rooms: "
                       f"weights {list(map(list, calibration.weights))}, bias {list(calibration.bias)}")
        elif shipped is not None:
            calibration = shipped
            _out.print(f"{method.name}: the shipped calibration fitted on the tuning half"
                       + (f" ({tuning_rooms} of these rooms are from it: in-sample)" if tuning_rooms else ""))
    report = acc.evaluate(method, rooms, answer, calibration, show if verbose else None, held_out_of)
    _out.print(f"{escape(report.summary())}  [dim]{escape(method.description)}[/dim]")
    for line in report.matrix():
        _out.print(f"  {escape(line)}")
