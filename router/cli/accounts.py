"""``llamas accounts …`` and ``llamas ledger check``: the admin's hands on the ledger.

Each command upgrades the ledger's schema, runs in one transaction, and
turns every refusal into one red line and exit status 1.
"""

from __future__ import annotations

import typer
from rich.markup import escape

from router.cli.common import err, ledger_session, out
from router.core import ledger, limits
from router.core.settings import get_settings

accounts_app = typer.Typer(help="Requester accounts: create, fund, pay out, rotate keys, set limits.")
keys_app = typer.Typer(help="API keys of requester accounts.")
accounts_app.add_typer(keys_app, name="keys")
ledger_app = typer.Typer()


@ledger_app.callback()
def _ledger_group() -> None:
    """The double-entry ledger."""
    # An app with one command would otherwise *be* that command; a callback
    # keeps `ledger check` a subcommand here and when mounted on `llamas`.

@accounts_app.command("create")
def create(
    name: str = typer.Argument(..., help="Account name, unique."),
    deposit: int = typer.Option(0, "--deposit", min=0, help="Initial deposit, smallest unit."),
) -> None:
    """Open a requester account and print its API key (shown only this once)."""
    with ledger_session() as session:
        account, api_key = ledger.create_account(session, name, deposit=deposit)
        funds = ledger.balance(session, account)
    out.print(f"created account [bold]{escape(name)}[/bold] with balance {funds}")
    # Plain print: the key must stay one unwrapped, unstyled line for copy and pipes.
    print(api_key)
    out.print(
        "[yellow]This API key is shown only once; only its hash is stored. "
        "Keep it now, or rotate it with `llamas accounts keys rotate`.[/yellow]"
    )


@accounts_app.command("deposit")
def deposit(name: str, amount: int) -> None:
    """Credit AMOUNT (smallest unit) paid in from outside to account NAME."""
    with ledger_session() as session:
        account = ledger.account_by_name(session, name)
        ledger.deposit(session, account, amount)
        funds = ledger.balance(session, account)
    out.print(f"{escape(name)}: {funds}")


@accounts_app.command("withdraw")
def withdraw(name: str, amount: int) -> None:
    """Pay AMOUNT (smallest unit) out of account NAME."""
    with ledger_session() as session:
        account = ledger.account_by_name(session, name)
        ledger.withdraw(session, account, amount)
        funds = ledger.balance(session, account)
    out.print(f"{escape(name)}: {funds}")


@accounts_app.command("balance")
def balance(name: str) -> None:
    """Print the balance of account NAME (smallest unit)."""
    with ledger_session() as session:
        funds = ledger.balance(session, ledger.account_by_name(session, name))
    out.print(f"{escape(name)}: {funds}")


#: What ``accounts limits`` prints for each limit, in order.
LIMIT_LABELS = {
    "queued": "queued jobs",
    "in_flight": "slots in flight (a job of n choices holds n)",
    "requests_per_minute": "requests per minute",
    "tokens_per_minute": "tokens per minute",
    "request_tokens": "n × max_tokens per request",
}


@accounts_app.command("limits")
def limits_command(
    name: str = typer.Argument(..., help="Account name."),
    queued: int | None = typer.Option(None, "--queued", min=1, help="Jobs it may have waiting in the queue."),
    in_flight: int | None = typer.Option(None, "--in-flight", min=1, help="Slots its running jobs may hold at once (n each)."),
    rpm: int | None = typer.Option(None, "--rpm", min=0, help="Requests admitted per minute; 0 = no limit."),
    tpm: int | None = typer.Option(
        None, "--tpm", min=0, help="Tokens (prompt + n × max_tokens) admitted per minute; 0 = no limit."),
    request_tokens: int | None = typer.Option(
        None, "--request-tokens", min=1, help="Largest n × max_tokens of one request."),
    clear: bool = typer.Option(False, "--clear", help="Drop the account's own limits first: back to the defaults."),
) -> None:
    """Show account NAME's fair-share limits; set its own with the options (the rest stay the defaults)."""
    settings = get_settings()
    with ledger_session() as session:
        account = ledger.account_by_name(session, name)
        limits.set_own(session, account, clear=clear, queued=queued, in_flight=in_flight,
                       requests_per_minute=rpm, tokens_per_minute=tpm, request_tokens=request_tokens)
        in_force = limits.of(session, settings, account.id)
        own = limits.own(session, account.id)
    out.print(f"limits of [bold]{escape(name)}[/bold]:")
    for field, label in LIMIT_LABELS.items():
        value = getattr(in_force, field)
        shown = "no limit" if value == 0 and field.endswith("per_minute") else str(value)
        out.print(f"  {label}: {shown}  ({'set for this account' if field in own else 'default'})")


@keys_app.command("rotate")
def rotate(name: str) -> None:
    """Replace account NAME's API key; the old key stops working at once."""
    with ledger_session() as session:
        api_key = ledger.rotate_key(session, ledger.account_by_name(session, name))
    print(api_key)
    out.print(
        "[yellow]This API key is shown only once; the previous key no longer works.[/yellow]"
    )


@ledger_app.command("check")
def check() -> None:
    """Audit the books: exit 1 with one line per problem unless they balance."""
    with ledger_session() as session:
        problems = ledger.check(session)
    if problems:
        for problem in problems:
            err.print(f"[red]{escape(problem)}[/red]", soft_wrap=True)
        raise typer.Exit(1)
    out.print("[green]the books balance[/green]")
