"""``llamas workers …``: the herd, and telling a running worker which model to serve."""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from typing import Any

import typer
from rich.markup import escape
from rich.table import Table

from llama_tasks import control
from llama_tasks.errors import LlamasError
from router.admin import INIT_TIMEOUT_S, HerdAdmin
from router.cli.common import fail, out
from router.core.preflight import broker_problem
from router.core.settings import get_settings

workers_app = typer.Typer(help="The herd: list workers, tell one which model to serve (Init).")


def _admin() -> HerdAdmin:
    settings = get_settings()
    problem = broker_problem(settings)
    if problem is not None:
        fail(problem)
    return HerdAdmin(settings)


def _ago(ts: float | None) -> str:
    if ts is None:
        return "—"
    seconds = max(0.0, time.time() - ts)
    return f"{seconds:.0f}s ago" if seconds < 120 else f"{seconds / 60:.0f}m ago"


def _init_line(last: dict[str, Any] | None) -> str:
    if not last:
        return ""
    reason = f": {last['reason']}" if last.get("reason") else ""
    return f"{last.get('model')} {last.get('outcome')}{reason}"


@workers_app.command("list")
def list_workers(as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Each live worker: its model, state (serving, draining, loading, idle) and since when."""
    lines = _admin().workers()
    if as_json:
        out.print_json(json.dumps([asdict(line) for line in lines]))
        return
    table = Table("worker", "model", "state", "since", "slots", "busy", "gpus", "last Init", title="workers")
    for line in lines:
        table.add_row(escape(line.worker), escape(line.model or "—"), line.state, _ago(line.since), str(line.slots),
                      str(line.busy), ",".join(map(str, line.gpus)) or "cpu", escape(_init_line(line.last_init)))
    out.print(table)
    if not lines:
        out.print("no live workers (start one: celery -A llama_tasks worker, or llamas up)")


@workers_app.command("init")
def init(
    worker: str = typer.Argument(..., help="Worker name, as `llamas workers list` shows it."),
    model: str = typer.Argument(..., help="A registered model name, or its sha256 (`llamas models list`)."),
    grace: float = typer.Option(control.GRACE_S, "--grace", min=0,
                                help="Seconds its running jobs may take to finish before they are handed back."),
    timeout: float = typer.Option(INIT_TIMEOUT_S, "--timeout", min=1, help="Seconds to wait for it to serve MODEL."),
    wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the worker until it serves MODEL."),
) -> None:
    """Tell a running WORKER to serve MODEL: it drains its jobs, loads MODEL once, and takes its queue."""
    admin = _admin()

    def progress(doc: dict[str, Any]) -> None:
        out.print(f"  {escape(doc['worker'])}: {doc.get('state')} {escape(str(doc.get('model') or '—'))}")

    try:
        doc = admin.init(worker, model, grace_s=grace, wait=wait, timeout_s=timeout, on_change=progress)
    except FileNotFoundError:
        fail(f"no herder key at {admin.settings.private_key_file}: Inits are signed with it "
             "(run this where the herder runs, after `llamas keys generate`)")
    except LlamasError as exc:
        fail(str(exc))
    if not wait:
        out.print(f"sent Init {doc['nonce']} to {escape(worker)}: serve {escape(doc['model'])}")
        return
    out.print(f"[green]{escape(worker)} serves {escape(str(doc.get('model')))}[/green]")
