"""``llamas operators …``: register operators, show what they earned, pay them out.

Each command upgrades the ledger's schema, runs in one transaction, and
turns every refusal into one red line and exit status 1 (as ``llamas accounts``).
"""

from __future__ import annotations

import typer
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from rich.markup import escape
from rich.table import Table

from llama_tasks import signing
from llama_tasks.settings import operator_key_path
from router.cli.broker import MODEL_OPTION, issue, show_operator_credential
from router.cli.common import err, fail, ledger_session, out, read_public_key
from router.core import broker_access, operators
from router.core.settings import get_settings

operators_app = typer.Typer(
    help="Operators: accounts that run workers and earn a share of each job they serve.",
    no_args_is_help=True,
)


@operators_app.command("add")
def add(
    name: str = typer.Argument(..., help="Operator name; also the name of its account."),
    public_key: str | None = typer.Option(
        None, "--public-key",
        help="The operator's Ed25519 public key: a file (base64 or PEM) or base64 text. "
        "Default: generate a key pair and write the private key under the herder's home.",
        show_default=False,
    ),
    model: list[str] = MODEL_OPTION,
) -> None:
    """Register operator NAME (opening account NAME if missing) with its workers' signing key and broker user."""
    private: Ed25519PrivateKey | None = None
    if public_key is None:
        private = Ed25519PrivateKey.generate()
        key = private.public_key()
        key_file = operator_key_path(get_settings().home, name)
    else:
        key = read_public_key(public_key)
    with ledger_session() as session:
        _, api_key = operators.register(session, name, key)
        if private is not None:
            try:
                # Before the commit: a key that cannot be written leaves nothing registered.
                signing.write_private(key_file, private, replace=False)
            except FileExistsError:
                fail(f"{key_file} exists; register its public key with --public-key, or move it away")
            except OSError as exc:
                fail(f"cannot write {key_file}: {exc.strerror or type(exc).__name__}")
        url = issue(session, broker_access.OPERATOR, name, model)
    out.print(f"registered operator [bold]{escape(name)}[/bold], key id {signing.key_id(key)}")
    if api_key is not None:
        out.print(f"opened account [bold]{escape(name)}[/bold]; its API key:")
        # Plain print: the key must stay one unwrapped, unstyled line for copy and pipes.
        print(api_key)
        out.print("[yellow]This API key is shown only once; only its hash is stored.[/yellow]")
    if private is not None:
        out.print(f"private key written to {escape(str(key_file))} (mode 0600): give it to the operator's "
                   "workers, and keep no other copy here", soft_wrap=True)
    show_operator_credential(name, model, url)


@operators_app.command("list")
def list_() -> None:
    """Every operator: key id, jobs, earned, paid out and balance (smallest unit)."""
    with ledger_session() as session:
        rows = operators.list_operators(session)
    if not rows:
        err.print("no operators (`llamas operators add NAME`)")
        return
    table = Table("operator (and account)", "key id", "jobs", "earned", "paid out", "balance")
    for row in rows:
        table.add_row(escape(row["operator"]), row["key_id"], str(row["jobs"]),
                      str(row["earned"]), str(row["paid_out"]), str(row["balance"]))
    out.print(table)


@operators_app.command("earnings")
def earnings(name: str) -> None:
    """What operator NAME earned, was paid out and holds (smallest unit)."""
    with ledger_session() as session:
        row = operators.earnings(session, name)
    out.print(f"{escape(name)}: earned {row['earned']} on {row['jobs']} jobs, paid out {row['paid_out']}, "
               f"balance {row['balance']} (key id {row['key_id']})", highlight=False)


@operators_app.command("payout")
def payout(name: str, amount: int) -> None:
    """Pay AMOUNT (smallest unit) of operator NAME's balance out to it."""
    with ledger_session() as session:
        operators.payout(session, name, amount)
        row = operators.earnings(session, name)
    out.print(f"{escape(name)}: paid out {amount}; balance {row['balance']}", highlight=False)
