"""What the ``llamas`` command groups share: consoles, one-line refusals, a ledger transaction, reading a key."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from llama_tasks.errors import LlamasError
from router.core.db import make_engine, make_sessionmaker, upgrade
from router.core.errors import InvalidPublicKey
from router.core.operators import parse_public_key
from router.core.settings import get_settings

out = Console()
err = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print one red line and leave with status 1, never a traceback."""
    err.print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]", soft_wrap=True)
    raise typer.Exit(1)


KEY_OPTION = typer.Option(None, "--key", help="API key (default: LLAMAS_API_KEY).", show_default=False)


def need_key(key: str | None) -> str:
    """``--key``, else ``LLAMAS_API_KEY``; a one-line refusal when neither is set."""
    api_key = key or get_settings().api_key
    if not api_key:
        fail("no API key: pass --key or set LLAMAS_API_KEY (`llamas accounts create NAME` makes one)")
    return api_key


def herder(key: str | None = None) -> Any:
    """A client of the herder (``--key``, else ``LLAMAS_API_KEY``); fails at once when the broker does not answer."""
    from router.client import Herder
    from router.core.preflight import broker_problem

    # Up front: without Redis, Celery's result store retries for ~20 s and then
    # fails with a RuntimeError that says nothing about what to do.
    settings = get_settings()
    problem = broker_problem(settings)
    if problem is not None:
        fail(problem)
    return Herder(key or settings.api_key)


@contextmanager
def ledger_session() -> Iterator[Session]:
    """Open one committed-on-success transaction on the configured, upgraded ledger."""
    try:
        url = get_settings().ledger_url
        upgrade(url)
        engine = make_engine(url)
        try:
            with make_sessionmaker(engine).begin() as session:
                yield session
        finally:
            engine.dispose()
    except LlamasError as exc:
        fail(str(exc))
    except SQLAlchemyError as exc:
        # The driver's own message, without SQLAlchemy's statement dump.
        cause = getattr(exc, "orig", None) or exc
        fail(f"ledger database: {str(cause).strip().splitlines()[0]}")


def read_public_key(given: str) -> Ed25519PublicKey:
    """An Ed25519 public key from a file holding one (base64 or PEM), or given inline as base64."""
    path = Path(given).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # a name too long to be a path is base64 text, or nothing
        is_file = False
    try:
        text = path.read_text() if is_file else given
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read the public key file {path}: {type(exc).__name__}")
    try:
        return parse_public_key(text)
    except InvalidPublicKey as exc:
        fail(f"{exc} (in {path})" if is_file else f"{exc}, and no file {given!r} exists")
