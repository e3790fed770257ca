"""``llamas accounts …`` and ``llamas ledger check``: the operator's hands on the ledger.

Each command upgrades the ledger's schema, runs in one transaction, and
turns every refusal into one red line and exit status 1.
"""

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
from router import ledger
from router.db import make_engine, make_sessionmaker, upgrade
from router.settings import get_settings

accounts_app = typer.Typer(help="Requester accounts: create, fund, pay out, rotate keys.")
keys_app = typer.Typer(help="API keys of requester accounts.")
accounts_app.add_typer(keys_app, name="keys")
ledger_app = typer.Typer()


@ledger_app.callback()
def _ledger_group() -> None:
    """The double-entry ledger."""
    # An app with one command would otherwise *be* that command; a callback
    # keeps `ledger check` a subcommand here and when mounted on `llamas`.

_out = Console()
_err = Console(stderr=True)


@contextmanager
def _ledger() -> Iterator[Session]:
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
        _fail(str(exc))
    except SQLAlchemyError as exc:
        # The driver's own message, without SQLAlchemy's statement dump.
        cause = getattr(exc, "orig", None) or exc
        _fail(f"ledger database: {str(cause).strip().splitlines()[0]}")


def _fail(message: str) -> NoReturn:
    """Print one red line and leave with status 1, never a traceback."""
    _err.print(f"[bold red]error:[/bold red] [red]{escape(message)}[/red]", soft_wrap=True)
    raise typer.Exit(1)


@accounts_app.command("create")
def create(
    name: str = typer.Argument(..., help="Account name, unique."),
    deposit: int = typer.Option(0, "--deposit", min=0, help="Initial deposit, smallest unit."),
) -> None:
    """Open a requester account and print its API key (shown only this once)."""
    with _ledger() as session:
        account, api_key = ledger.create_account(session, name, deposit=deposit)
        funds = ledger.balance(session, account)
    _out.print(f"created account [bold]{escape(name)}[/bold] with balance {funds}")
    # Plain print: the key must stay one unwrapped, unstyled line for copy and pipes.
    print(api_key)
    _out.print(
        "[yellow]This API key is shown only once; only its hash is stored. "
        "Keep it now, or rotate it with `llamas accounts keys rotate`.[/yellow]"
    )


@accounts_app.command("deposit")
def deposit(name: str, amount: int) -> None:
    """Credit AMOUNT (smallest unit) paid in from outside to account NAME."""
    with _ledger() as session:
        account = ledger.account_by_name(session, name)
        ledger.deposit(session, account, amount)
        funds = ledger.balance(session, account)
    _out.print(f"{escape(name)}: {funds}")


@accounts_app.command("withdraw")
def withdraw(name: str, amount: int) -> None:
    """Pay AMOUNT (smallest unit) out of account NAME."""
    with _ledger() as session:
        account = ledger.account_by_name(session, name)
        ledger.withdraw(session, account, amount)
        funds = ledger.balance(session, account)
    _out.print(f"{escape(name)}: {funds}")


@accounts_app.command("balance")
def balance(name: str) -> None:
    """Print the balance of account NAME (smallest unit)."""
    with _ledger() as session:
        funds = ledger.balance(session, ledger.account_by_name(session, name))
    _out.print(f"{escape(name)}: {funds}")


@keys_app.command("rotate")
def rotate(name: str) -> None:
    """Replace account NAME's API key; the old key stops working at once."""
    with _ledger() as session:
        api_key = ledger.rotate_key(session, ledger.account_by_name(session, name))
    print(api_key)
    _out.print(
        "[yellow]This API key is shown only once; the previous key no longer works.[/yellow]"
    )


@ledger_app.command("check")
def check() -> None:
    """Audit the books: exit 1 with one line per problem unless they balance."""
    with _ledger() as session:
        problems = ledger.check(session)
    if problems:
        for problem in problems:
            _err.print(f"[red]{escape(problem)}[/red]", soft_wrap=True)
        raise typer.Exit(1)
    _out.print("[green]the books balance[/green]")
