"""What the ``llamas`` command groups share: their consoles, one-line refusals and a ledger transaction."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from llama_tasks.errors import LlamasError
from router.db import make_engine, make_sessionmaker, upgrade
from router.settings import get_settings

out = Console()
err = Console(stderr=True)


def fail(message: str) -> NoReturn:
    """Print one red line and leave with status 1, never a traceback."""
    err.print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]", soft_wrap=True)
    raise typer.Exit(1)


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
