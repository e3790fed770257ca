"""The ``llamas`` command line.

Requests (info, quote, run, jobs) go through the broker to the herder, like
any Python client; admin commands (accounts, ledger, keys, models) work
on local files and the ledger directly. Every refusal or failure is one
line on stderr and a non-zero exit code, never a traceback.

Other installed packages add command groups through the ``llamas.cli`` entry
point group: each entry point's name is the command, its object a
``typer.Typer`` (the example agent adds ``llamas agent`` and ``llamas world``
this way). This module imports none of them by name.
"""

from __future__ import annotations

import json
import sys
import time
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from llama_tasks import registry, signing
from llama_tasks.errors import LlamasError
from llama_tasks.registry import DEFAULT_MODEL
from llama_tasks.settings import house_key_path
from router.cli.accounts import accounts_app, ledger_app
from router.cli.broker import broker_app
from router.cli.common import KEY_OPTION
from router.cli.common import herder as _herder
from router.cli.common import need_key as _need_key
from router.cli.embed import embed
from router.cli.operators import operators_app
from router.cli.receipts import receipts_app
from router.cli.workers import workers_app

#: Entry point group through which installed packages add command groups.
PLUGIN_GROUP = "llamas.cli"

app = typer.Typer(help="llamas: paid, queued LLM inference on Celery.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
keys_app = typer.Typer(help="The herder's Ed25519 signing keys.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
jobs_app = typer.Typer(help="Your jobs: list, show, cancel, raise the bid.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.add_typer(accounts_app, name="accounts")
app.add_typer(ledger_app, name="ledger")
app.add_typer(jobs_app, name="jobs")
app.add_typer(receipts_app, name="receipts")
app.add_typer(operators_app, name="operators")
app.add_typer(workers_app, name="workers")
app.add_typer(broker_app, name="broker")
app.command("embed")(embed)

out = Console()
err = Console(stderr=True)


def add_plugins(target: typer.Typer, plugins: list[EntryPoint] | None = None) -> list[str]:
    """Mount every command group of ``PLUGIN_GROUP`` on ``target``; returns the names mounted.

    A plugin that fails to load, is not a ``typer.Typer`` or would shadow a
    command is skipped with one line on stderr: a broken package must not
    take the whole CLI down with it.
    """
    taken = {group.name for group in target.registered_groups}
    taken |= {command.name or (command.callback.__name__.replace("_", "-") if command.callback else None)
              for command in target.registered_commands}
    mounted = []
    for plugin in entry_points(group=PLUGIN_GROUP) if plugins is None else plugins:
        try:
            if plugin.name in taken:
                raise ValueError(f"the command name {plugin.name!r} is taken")
            group = plugin.load()
            if not isinstance(group, typer.Typer):
                raise TypeError(f"{type(group).__name__} is not a typer.Typer")
        # SystemExit too: a package may refuse its own configuration at import.
        except (Exception, SystemExit) as exc:
            reason = (str(exc).strip().splitlines() or [""])[0]
            err.print(f"[yellow]warning:[/] skipped the command group {escape(repr(plugin.name))} "
                      f"({escape(plugin.value)}): {escape(type(exc).__name__)}: {escape(reason)}",
                      highlight=False, soft_wrap=True)
            continue
        target.add_typer(group, name=plugin.name)
        taken.add(plugin.name)
        mounted.append(plugin.name)
    return mounted


def fail(message: str) -> NoReturn:
    err.print(f"[red]error:[/] {message}", highlight=False)
    raise typer.Exit(1)


def _settings() -> Any:
    from router.core.settings import get_settings

    return get_settings()


# --- running the service ------------------------------------------------------


@app.command()
def up(slots: int = typer.Option(0, "--slots", "-s", min=0, max=256,
                                 help="Jobs each worker batches at once (0 = LLAMAS_SLOTS, default 8)."),
       port: int = typer.Option(8000, help="Port of the HTTP gateway."),
       flower_port: int = typer.Option(5555, help="Port of Flower."),
       model: list[str] = typer.Option([], help="Model to serve (repeatable; default LLAMAS_MODEL)."),
       gpu: list[int] = typer.Option([], help="GPU id to serve on, one worker each (repeatable; "
                                              "default LLAMAS_GPUS, none = the CPU)."),
       workers: int = typer.Option(0, "--workers", min=0, max=64,
                                   help="Start N workers with no model, which the herder gives models as the "
                                        "queue needs (needs LLAMAS_PLACEMENT=demand).")) -> None:
    """Start the whole service on this machine and answer a paid demo request."""
    from router.local.up import up as run_up

    run_up(slots or None, port, flower_port, model or None, gpu or None, placed=workers)


@app.command()
def down(grace: float = typer.Option(30.0, min=0, help="Seconds between SIGTERM and SIGKILL.")) -> None:
    """Stop what `llamas up` runs for this home, or what a killed one left running."""
    from router.local.up import down as run_down

    run_down(grace)


# --- prices -------------------------------------------------------------------


@app.command()
def info(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Prices, models, the herd and the price-discovery table."""
    doc = _herder().info()
    if as_json:
        out.print_json(json.dumps(doc))
        return
    out.print(f"[bold]{doc['name']}[/] {doc['version']} — base fee {doc['base_fee']}, "
              f"fee per token {doc['fee_per_token']} (cached {doc.get('fee_per_cached_token', doc['fee_per_token'])}), "
              f"fee per embedding token {doc.get('fee_per_embedding_token', '—')}, "
              f"queue {doc['queue_length']}, running {doc['running']}, "
              f"last accepted multiplier {doc['last_multiplier'] or '—'}")
    models = Table("model", "id", "slots", "context per job", title="models")
    for m in doc["models"]:
        models.add_row(m["name"], m["id"][:16] + "…", str(m["slots"]), f"{m['context_per_job']} tokens")
    herd = Table("worker", "model", "slots", "busy", "gpus", title="herd")
    for w in doc["herd"]:
        herd.add_row(w["worker"], w["model"] or "—", str(w["slots"]), str(w["busy"]), ",".join(map(str, w["gpus"])) or "cpu")
    prices = Table("multiplier", "queue position", "expected wait", title="price discovery")
    for row in doc["price_discovery"]:
        wait = row["expected_wait_s"]
        prices.add_row(f"×{row['multiplier']}", str(row["position"]), "—" if wait is None else f"{wait:.1f}s")
    out.print(models, herd, prices)


@app.command()
def quote(prompt: str, tokens: int = typer.Option(128, "--tokens", "-t", help="max_tokens"),
          model: str = typer.Option(DEFAULT_MODEL),
          chat: bool = typer.Option(False, help="Send PROMPT as a user chat message."),
          n: int = typer.Option(1, "--n", help="Completions asked for.")) -> None:
    """What a request would cost: base fee + fee per token × (prompt tokens + n × max tokens)."""
    herder = _herder()
    doc = herder.quote(None if chat else prompt, tokens,
                       messages=[{"role": "user", "content": prompt}] if chat else None, model=model, n=n)
    times = f"{doc['n']} × " if doc["n"] != 1 else ""
    out.print(f"{doc['quote']} = {doc['base_fee']} + {doc['fee_per_token']} × "
              f"({doc['prompt_tokens']} prompt + {times}{doc['max_tokens']} max tokens)")


# --- requests -----------------------------------------------------------------


@app.command()
def run(
    prompt: str,
    tokens: int = typer.Option(128, "--tokens", "-t", help="max_tokens"),
    key: str | None = KEY_OPTION,
    chat: bool = typer.Option(True, help="Send PROMPT as a chat message (--no-chat: raw prompt)."),
    stream: bool = typer.Option(False, "--stream", help="Print tokens as they arrive."),
    as_json: bool = typer.Option(False, "--json", help="Print the response document as JSON."),
    fee: int | None = typer.Option(None, help="Offer this absolute fee."),
    multiplier: float | None = typer.Option(None, help="Offer this multiple of the quote (default 1)."),
    deadline: float | None = typer.Option(None, help="Seconds the job may wait in the queue."),
    stop: list[str] = typer.Option([], help="Stop string (repeatable)."),
    model: str = typer.Option(DEFAULT_MODEL),
    reference: str | None = typer.Option(None, help="Idempotency reference."),
    timeout: float = typer.Option(600.0, help="Seconds to wait for the answer."),
    n: int = typer.Option(1, "--n", help="Completions to generate (each paid for; --stream streams the first)."),
    tools: Path | None = typer.Option(None, "--tools", help="JSON file of function tools the model may call "
                                      "(OpenAI's tools list); the calls are printed as JSON lines."),
    tool_choice: str | None = typer.Option(None, "--tool-choice", help="auto, none, required, or a function's name."),
) -> None:
    """Pay for one generation and print the answer."""
    offered = _tools_file(tools) if tools is not None else None
    if offered is not None and not chat:
        fail("--tools needs a chat message (drop --no-chat)")
    herder = _herder(_need_key(key))
    handle = herder.run(
        None if chat else prompt, tokens, messages=[{"role": "user", "content": prompt}] if chat else None,
        fee=fee, multiplier=multiplier, deadline_s=deadline, stop=stop, model=model, reference=reference, n=n,
        tools=offered, tool_choice=_tool_choice(tool_choice),
    )
    if not as_json:
        err.print(f"job {handle.id}: quote {handle.doc['quote']}, held {handle.doc['offered']} "
                  f"(×{handle.doc['multiplier']:.2f})", highlight=False)
        _wait_in_queue(handle, timeout)
    if stream and not as_json:
        if n > 1:
            err.print("--- choice 0", highlight=False)
        for piece in handle.stream(timeout=timeout):
            out.print(piece, end="", markup=False, highlight=False)
        out.print()
    doc = handle.response(timeout=timeout)
    if as_json:
        out.print_json(json.dumps(doc))
    if doc["status"] != "done":
        fail(f"job {doc['job_id']} {doc['status']}: {doc.get('error')}: {doc.get('message')} "
             f"(refunded {doc.get('refunded')})")
    if as_json:
        return
    choices = doc.get("choices") or [{"index": 0, "text": doc["text"]}]
    for choice in choices:
        # Streamed, the first choice's text was shown as it came (its calls, parsed, are shown now).
        shown = stream and choice["index"] == 0
        if n > 1 and not shown:
            err.print(f"--- choice {choice['index']} (finish={choice.get('finish_reason')})", highlight=False)
        if "tool_calls" in choice:
            if choice.get("content") and not shown:
                out.print(choice["content"], markup=False, highlight=False)
            for call in choice["tool_calls"]:
                out.print(json.dumps(call), markup=False, highlight=False)
        elif not shown:
            out.print(choice["text"], markup=False, highlight=False)
    err.print(f"{doc['prompt_tokens']} prompt ({doc.get('cached_tokens') or 0} cached) + "
              f"{doc['completion_tokens']} completion tokens, "
              f"finish={doc['finish_reason']}; charged {doc['charged']}, refunded {doc['refunded']}",
              highlight=False)


def _tools_file(path: Path) -> list[dict[str, Any]]:
    """The tools list a ``--tools`` file holds (a list, or an object with a ``tools`` list)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        fail(f"--tools {path}: {exc}")
    if isinstance(data, dict) and "tools" in data:
        data = data["tools"]
    if not isinstance(data, list):
        fail(f"--tools {path}: expected a JSON list of tools")
    return data


def _tool_choice(choice: str | None) -> str | dict[str, Any] | None:
    """``--tool-choice``: one of the modes, or a function's name."""
    if choice is None or choice in ("auto", "none", "required"):
        return choice
    return {"type": "function", "function": {"name": choice}}


def _wait_in_queue(handle: Any, timeout: float) -> None:
    """Show the queue position until the job leaves the queue."""
    deadline = time.monotonic() + timeout
    if handle.doc["state"] != "queued":
        return
    with Live(Text(""), console=err, transient=True) as live:
        while time.monotonic() < deadline:
            state = handle.status()
            if state != "queued":
                return
            live.update(Text(f"waiting in the queue: position {handle.doc['position']}"))
            time.sleep(0.5)


@jobs_app.command("list")
def jobs_list(key: str | None = KEY_OPTION, limit: int = typer.Option(20)) -> None:
    """Your most recent jobs."""
    table = Table("job", "state", "model", "×bid", "offered", "charged", "refunded", "reference")
    for j in _herder(_need_key(key)).jobs(limit):
        table.add_row(j["job_id"], j["state"], j["model"], f"{j['multiplier']:.2f}", str(j["offered"]),
                      str(j["charged"] if j["charged"] is not None else "—"),
                      str(j["refunded"] if j["refunded"] is not None else "—"), j["reference"] or "")
    out.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str, key: str | None = KEY_OPTION) -> None:
    """One job's state, position and (when finished) response."""
    out.print_json(json.dumps(_herder(_need_key(key)).job(job_id).doc))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str, key: str | None = KEY_OPTION) -> None:
    """Cancel a job: a queued one ends with its whole hold returned; a running one stops at the worker's
    next step and is charged for what it generated."""
    doc = _herder(_need_key(key)).job(job_id).cancel()
    if "response" in doc:
        out.print(f"job {job_id} {doc['state']}; refunded {doc['response']['refunded']}")
    else:
        # Still running: the worker stops it at its next step, and it ends then (``llamas jobs show``).
        out.print(f"job {job_id} is {doc['state']}: asked to stop; it ends at the worker's next step, "
                  "charged for the tokens it generated", highlight=False)


@jobs_app.command("raise")
def jobs_raise(job_id: str, key: str | None = KEY_OPTION, fee: int | None = typer.Option(None),
               multiplier: float | None = typer.Option(None)) -> None:
    """Raise a queued job's bid (the difference is held)."""
    if fee is None and multiplier is None:
        fail("give --fee or --multiplier")
    doc = _herder(_need_key(key)).job(job_id).raise_bid(fee=fee, multiplier=multiplier)
    out.print(f"job {job_id}: offered {doc['offered']} (×{doc['multiplier']:.2f}), position {doc['position']}")


# --- keys and models ------------------------------------------------------------


@keys_app.command("generate")
def keys_generate(force: bool = typer.Option(False, help="Replace existing key pairs.")) -> None:
    """Create the herder's key pair and the house workers' (each private key stays where it is used)."""
    settings = _settings()
    house_file = house_key_path(settings.home)
    if settings.private_key_file.exists() and house_file.exists() and not force:
        fail(f"{settings.private_key_file} and {house_file} exist; pass --force to replace them "
             "(workers must get the new keys)")
    if force or not settings.private_key_file.exists():
        _, pub_file = signing.generate_keypair(settings.home)
        out.print(f"private key: {settings.private_key_file} (keep it on the herder)")
        out.print(f"public key:  {pub_file}")
        out.print(f"for workers: LLAMAS_PUBLIC_KEY={pub_file.read_text().strip()}")
    if force or not house_file.exists():
        _, house_pub = signing.generate_keypair(settings.home, "house")
        out.print(f"house key:   {house_file} (the house's own workers sign their results with it: copy it to "
                  f"their hosts, or point LLAMAS_HOUSE_KEY at it; the herder keeps {house_pub.name})", soft_wrap=True)


@keys_app.command("show")
def keys_show() -> None:
    """Print the public key workers must be configured with."""
    # The herder's own file, not LLAMAS_PUBLIC_KEY: that setting is a worker's.
    public = signing.load_public("", _settings().public_key_file)
    out.print(f"LLAMAS_PUBLIC_KEY={signing.encode_public(public)}  (key id {signing.key_id(public)})")


@models_app.command("list")
def models_list() -> None:
    """Registered models with their ids (sha256 of the GGUF file)."""
    table = Table("name", "model id (sha256)", "path", "file")
    for spec in registry.load_registry(_settings().models_file).values():
        table.add_row(spec.name, spec.model_id, spec.path, "ok" if Path(spec.path).is_file() else "[red]missing[/]")
    out.print(table)


@models_app.command("add")
def models_add(name: str, path: Path) -> None:
    """Register a GGUF file under NAME (workers serve it with LLAMAS_MODEL=NAME)."""
    spec = registry.add_model(_settings().models_file, name, path)
    out.print(f"added {spec.name}: id {spec.model_id}")
    out.print(f"start a worker: LLAMAS_MODEL={spec.name} celery -A llama_tasks worker -Q llama.{spec.name}")


def main() -> None:
    """Entry point: turn every expected failure into one line and exit code 1."""
    from celery.exceptions import TimeoutError as CeleryTimeout
    from kombu.exceptions import OperationalError
    from redis.exceptions import ConnectionError as RedisConnectionError

    try:
        add_plugins(app)
        app()
    except LlamasError as exc:
        err.print(f"[red]error:[/] {exc}", highlight=False)
        sys.exit(1)
    except CeleryTimeout:
        err.print("[red]error:[/] the herder did not answer in time — is it running? (`llamas up`)")
        sys.exit(1)
    except (OperationalError, RedisConnectionError) as exc:
        err.print(f"[red]error:[/] cannot reach the broker: {exc}", highlight=False)
        sys.exit(1)
    except RuntimeError as exc:
        # Celery's result store gives up on a lost Redis with a RuntimeError
        # whose cause is the connection error.
        if not isinstance(exc.__cause__, (OperationalError, RedisConnectionError)):
            raise
        err.print(f"[red]error:[/] lost the connection to the broker: {exc.__cause__}", highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
