"""The ``llamas`` command line."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from llama_tasks import registry, signing
from llama_tasks.errors import LlamasError
from llama_tasks.settings import WorkerSettings
from router.cli_accounts import accounts_app, ledger_app

app = typer.Typer(help="llamas: paid, queued LLM inference on Celery.", no_args_is_help=True)
keys_app = typer.Typer(help="The herder's Ed25519 signing keys.", no_args_is_help=True)
models_app = typer.Typer(help="The model registry.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")
app.add_typer(models_app, name="models")
app.add_typer(accounts_app, name="accounts")
app.add_typer(ledger_app, name="ledger")

out = Console()
err = Console(stderr=True)


def fail(message: str) -> None:
    err.print(f"[red]error:[/] {message}")
    raise typer.Exit(1)


@app.command()
def up(concurrency: int = typer.Option(0, "--concurrency", "-c", help="Worker processes (0 = settings).")) -> None:
    """Start the whole service on this machine and answer a demo request."""
    from router.up import up as run_up

    try:
        run_up(concurrency or None)
    except LlamasError as exc:
        fail(str(exc))


@keys_app.command("generate")
def keys_generate(force: bool = typer.Option(False, help="Replace an existing key pair.")) -> None:
    """Create the herder's key pair (private key stays with the herder)."""
    settings = WorkerSettings()
    if settings.private_key_file.exists() and not force:
        fail(f"{settings.private_key_file} exists; pass --force to replace it (workers must get the new public key)")
    _, pub_file = signing.generate_keypair(settings.home)
    out.print(f"private key: {settings.private_key_file} (keep it on the herder)")
    out.print(f"public key:  {pub_file}")
    out.print(f"for workers: LLAMAS_PUBLIC_KEY={pub_file.read_text().strip()}")


@keys_app.command("show")
def keys_show() -> None:
    """Print the public key workers must be configured with."""
    settings = WorkerSettings()
    try:
        public = signing.load_public(settings.public_key, settings.public_key_file)
    except LlamasError as exc:
        fail(str(exc))
    out.print(f"LLAMAS_PUBLIC_KEY={signing.encode_public(public)}  (key id {signing.key_id(public)})")


@models_app.command("list")
def models_list() -> None:
    """List registered models with their ids (sha256 of the GGUF file)."""
    settings = WorkerSettings()
    table = Table("name", "model id (sha256)", "path", "file")
    for spec in registry.load_registry(settings.models_file).values():
        table.add_row(spec.name, spec.model_id, spec.path, "ok" if Path(spec.path).is_file() else "[red]missing[/]")
    out.print(table)


@models_app.command("add")
def models_add(name: str, path: Path) -> None:
    """Register a GGUF file under NAME (workers serve it with LLAMAS_MODEL=NAME)."""
    settings = WorkerSettings()
    try:
        spec = registry.add_model(settings.models_file, name, path)
    except LlamasError as exc:
        fail(str(exc))
    out.print(f"added {spec.name}: id {spec.model_id}")
    out.print(f"start a worker: LLAMAS_MODEL={spec.name} celery -A llama_tasks worker -Q llama.{spec.name}")


def main() -> None:
    app()
