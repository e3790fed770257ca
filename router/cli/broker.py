"""``llamas broker …``: Redis credentials for operators' workers and requesters' clients.

Each credential is a Redis ACL user restricted to its role
(``router.core.broker_access``); its URL is printed once and only its
password's hash is kept. ``llamas operators add`` issues an operator's too.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis
import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy.orm import Session

from router.cli.common import err, ledger_session, out
from router.core import broker_access, operators
from router.core.models import BrokerUser
from router.core.settings import get_settings

broker_app = typer.Typer(
    help="Broker credentials: Redis users restricted to an operator's workers or a requester's client.",
    no_args_is_help=True,
)

MODEL_OPTION = typer.Option(
    [], "--model", help="A model the operator serves (repeatable). Default: every model's queue.",
    show_default=False,
)


def apply_now(user: BrokerUser) -> None:
    """Apply ``user`` to Redis at once; when Redis does not take it, the herder will within a minute."""
    r = redis.Redis.from_url(get_settings().redis_url, socket_connect_timeout=2, socket_timeout=5)
    try:
        broker_access.apply(r, user)
    except (redis.RedisError, OSError) as exc:
        err.print(f"[yellow]warning:[/yellow] Redis did not take broker user {escape(user.name)} now "
                  f"({escape(str(exc))}); a running herder applies it within a minute", soft_wrap=True)
    finally:
        r.close()


def issue(session: Session, role: str, owner: str, models: Sequence[str] = ()) -> str:
    """Store and apply a credential of ``role`` for ``owner``; returns its broker URL (to show once)."""
    user, password = broker_access.create(session, role, owner, models)
    apply_now(user)
    return broker_access.broker_url(get_settings().redis_url, user.name, password)


def show_url(url: str) -> None:
    out.print("its broker URL (use the broker's address as the participant reaches it):")
    # Plain print: one unwrapped, unstyled line for copy and pipes.
    print(url)
    out.print("[yellow]This URL is shown only once; only its password's hash is stored.[/yellow]")


def show_operator_credential(name: str, models: Sequence[str], url: str) -> None:
    """An operator's broker user, its URL (once) and how to start a worker with it."""
    out.print(f"broker user [bold]{escape(broker_access.user_name(broker_access.OPERATOR, name))}[/bold] "
              f"(models: {escape(', '.join(models) or 'all')})")
    show_url(url)
    out.print(f"start a worker as this operator: LLAMAS_REDIS_URL=<its broker URL> LLAMAS_OPERATOR={escape(name)} "
              "LLAMAS_OPERATOR_KEY=<its key file> celery -A llama_tasks worker -Q llama.<model>", soft_wrap=True)


@broker_app.command("client")
def client(name: str = typer.Argument(..., help="The requester's account.")) -> None:
    """Give account NAME's Python client a broker credential (submit, results, streams; nothing else)."""
    with ledger_session() as session:
        url = issue(session, broker_access.CLIENT, name)
    out.print(f"broker user [bold]{escape(broker_access.user_name(broker_access.CLIENT, name))}[/bold] "
              f"for account {escape(name)}")
    show_url(url)
    out.print("use it as LLAMAS_REDIS_URL, or Herder(api_key, redis_url=URL)", soft_wrap=True)


@broker_app.command("operator")
def operator(name: str = typer.Argument(..., help="A registered operator."),
             model: list[str] = MODEL_OPTION) -> None:
    """Give operator NAME's workers a broker credential again (after a revoke, or one registered earlier)."""
    with ledger_session() as session:
        operators.operator_by_name(session, name)
        url = issue(session, broker_access.OPERATOR, name, model)
    show_operator_credential(name, model, url)


@broker_app.command("list")
def list_() -> None:
    """Every broker user: role, owner, models, issued and revoked."""
    with ledger_session() as session:
        rows = broker_access.users(session)
        table = Table("user", "role", "owner", "models", "issued", "revoked")
        for user in rows:
            table.add_row(escape(user.name), user.role, escape(user.owner),
                          escape(user.models or ("all" if user.role == broker_access.OPERATOR else "")),
                          f"{user.created_at:%Y-%m-%d %H:%M}",
                          f"{user.revoked_at:%Y-%m-%d %H:%M}" if user.revoked_at else "")
    if not rows:
        err.print("no broker users (`llamas broker client NAME`, `llamas operators add NAME`)")
        return
    out.print(table)


@broker_app.command("revoke")
def revoke(name: str = typer.Argument(..., help="The broker user, as `llamas broker list` shows it.")) -> None:
    """Revoke broker user NAME: Redis deletes it and closes its connections."""
    with ledger_session() as session:
        user = broker_access.revoke(session, name)
        apply_now(user)
    out.print(f"revoked broker user [bold]{escape(name)}[/bold]")
