"""The exchange (the original's Bazar): an ``Exchange`` protocol and a durable paper exchange.

An order swaps a quantity of the quote token for the trade token at the price
a ``PriceFeed`` gives; the answer is an ``ActionResponse``, filled or rejected
with a reason. The paper exchange keeps integer balances (smallest units) and
orders in its own database — not the herder's ledger: it stands for a venue
the agent does not control. A client order id makes ``create_order``
idempotent, so a retried or duplicated order never fills twice.

Schema: ``metadata.create_all`` (idempotent) rather than Alembic migrations —
these are the example's own two tables, in their own database.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, cast

from sqlalchemy import BigInteger, CheckConstraint, Float, String, Text, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

from agent.db import make_engine, make_sessionmaker

if TYPE_CHECKING:
    from agent.settings import AgentSettings

FILLED, REJECTED = "filled", "rejected"
BUY = "buy"


@dataclass(frozen=True)
class Order:
    """Create-Order: spend ``quantity`` of ``quote`` (smallest units) on ``trade``."""

    account: str
    order_id: str  # chosen by the client; the same id is the same order
    quantity: int
    trade: str
    quote: str
    side: str = BUY


@dataclass(frozen=True)
class ActionResponse:
    """The exchange's answer to an order: filled (with what moved) or rejected (with why)."""

    order_id: str
    status: str
    reason: str = ""
    price: int = 0  # quote units per trade unit
    spent: int = 0  # quote units paid
    received: int = 0  # trade units bought

    @property
    def filled(self) -> bool:
        return self.status == FILLED


class PriceFeed(Protocol):
    """Where the exchange learns the current price of a pair."""

    def price(self, trade: str, quote: str) -> int:
        """Quote units per one trade unit, a positive integer."""
        ...


class Exchange(Protocol):
    """A venue the agent can trade on: the paper one here, a real one later."""

    def balances(self, account: str) -> dict[str, int]:
        """Token → balance (smallest units) of ``account``; empty if it has none."""
        ...

    def create_order(self, order: Order) -> ActionResponse:
        """Place ``order`` (idempotent by its order id) and answer how it ended."""
        ...

    def order_status(self, account: str, order_id: str) -> ActionResponse | None:
        """How an earlier order ended, or None if the exchange never saw it."""
        ...


@dataclass(frozen=True)
class FixedPrice:
    """A price feed that always quotes one price: enough for paper trading."""

    value: int

    def price(self, trade: str, quote: str) -> int:
        return self.value


# --- the paper exchange's tables -------------------------------------------------


class ExchangeBase(DeclarativeBase):
    """Declarative base of the paper exchange's own tables."""


class Balance(ExchangeBase):
    """One account's holding of one token."""

    __tablename__ = "exchange_balances"
    __table_args__ = (CheckConstraint("amount >= 0", name="ck_exchange_balances_amount"),)

    account: Mapped[str] = mapped_column(String(64), primary_key=True)
    token: Mapped[str] = mapped_column(String(16), primary_key=True)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)


class OrderRow(ExchangeBase):
    """One order as placed and how it ended."""

    __tablename__ = "exchange_orders"

    account: Mapped[str] = mapped_column(String(64), primary_key=True)
    order_id: Mapped[str] = mapped_column(String(200), primary_key=True)
    side: Mapped[str] = mapped_column(String(8), nullable=False)
    trade: Mapped[str] = mapped_column(String(16), nullable=False)
    quote: Mapped[str] = mapped_column(String(16), nullable=False)
    quantity: Mapped[int] = mapped_column(BigInteger, nullable=False)
    status: Mapped[str] = mapped_column(String(16), nullable=False)
    reason: Mapped[str] = mapped_column(Text, nullable=False, default="")
    price: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    spent: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    received: Mapped[int] = mapped_column(BigInteger, nullable=False, default=0)
    created_at: Mapped[float] = mapped_column(Float, nullable=False)

    def response(self) -> ActionResponse:
        return ActionResponse(self.order_id, self.status, self.reason, self.price, self.spent, self.received)


def _amount(session: Session, account: str, token: str) -> int:
    # A column read, not an entity: the conditional UPDATE below must not meet a stale loaded row.
    found = session.scalar(select(Balance.amount).where(Balance.account == account, Balance.token == token))
    return int(found or 0)


def _credit(session: Session, account: str, token: str, amount: int) -> None:
    row = session.get(Balance, (account, token))
    if row is None:
        session.add(Balance(account=account, token=token, amount=amount))
    else:
        row.amount += amount


def fill(order: Order, price: int, available: int) -> ActionResponse:
    """How ``order`` ends at ``price`` with ``available`` quote units: pure, no storage.

    Only whole trade units are bought; the remainder of the quantity stays
    with the buyer.
    """
    if order.side != BUY:
        return ActionResponse(order.order_id, REJECTED, f"unsupported side {order.side!r}")
    if order.quantity <= 0:
        return ActionResponse(order.order_id, REJECTED, f"quantity must be positive, got {order.quantity}")
    if price <= 0:
        return ActionResponse(order.order_id, REJECTED, f"no valid price for {order.trade}/{order.quote}")
    units = order.quantity // price
    if units == 0:
        return ActionResponse(order.order_id, REJECTED,
                              f"{order.quantity} {order.quote} buys no {order.trade} at price {price}", price)
    spent = units * price
    if available < spent:
        return ActionResponse(order.order_id, REJECTED,
                              f"insufficient {order.quote}: has {available}, needs {spent}", price)
    return ActionResponse(order.order_id, FILLED, "", price, spent, units)


class PaperExchange:
    """A durable paper exchange on SQLAlchemy 2 (SQLite or PostgreSQL)."""

    def __init__(self, sessions: sessionmaker[Session], feed: PriceFeed) -> None:
        self.sessions = sessions
        self.feed = feed

    @classmethod
    def open(cls, url: str, feed: PriceFeed) -> PaperExchange:
        """Connect to the exchange database at ``url``, creating its tables if needed."""
        engine = make_engine(url)
        ExchangeBase.metadata.create_all(engine)
        return cls(make_sessionmaker(engine), feed)

    def close(self) -> None:
        bind = self.sessions.kw.get("bind")
        if bind is not None:
            bind.dispose()

    def open_account(self, account: str, deposits: dict[str, int]) -> bool:
        """Give a new account its opening balances; False (and nothing moves) if it exists."""
        try:
            with self.sessions.begin() as session:
                if session.scalar(select(Balance).where(Balance.account == account).limit(1)) is not None:
                    return False
                for token, amount in deposits.items():
                    session.add(Balance(account=account, token=token, amount=amount))
        except IntegrityError:
            return False  # a concurrent opening won
        return True

    def balances(self, account: str) -> dict[str, int]:
        with self.sessions() as session:
            rows = session.scalars(select(Balance).where(Balance.account == account))
            return {row.token: row.amount for row in rows}

    def order_status(self, account: str, order_id: str) -> ActionResponse | None:
        with self.sessions() as session:
            row = session.get(OrderRow, (account, order_id))
            return row.response() if row is not None else None

    def create_order(self, order: Order) -> ActionResponse:
        try:
            return self._place(order)
        except IntegrityError:
            # The same order id was placed concurrently: that one is the order.
            found = self.order_status(order.account, order.order_id)
            assert found is not None
            return found

    def _place(self, order: Order) -> ActionResponse:
        with self.sessions.begin() as session:
            existing = session.get(OrderRow, (order.account, order.order_id))
            if existing is not None:
                return existing.response()
            price = self.feed.price(order.trade, order.quote)
            answer = fill(order, price, _amount(session, order.account, order.quote))
            if answer.filled:
                # Conditional debit: the balance cannot go below zero whatever runs beside us.
                debited = cast("CursorResult[Any]", session.execute(
                    update(Balance)
                    .where(Balance.account == order.account, Balance.token == order.quote,
                           Balance.amount >= answer.spent)
                    .values(amount=Balance.amount - answer.spent)
                    .execution_options(synchronize_session=False)
                )).rowcount
                if not debited:
                    answer = ActionResponse(order.order_id, REJECTED, f"insufficient {order.quote}", price)
                else:
                    _credit(session, order.account, order.trade, answer.received)
            session.add(OrderRow(
                account=order.account, order_id=order.order_id, side=order.side, trade=order.trade,
                quote=order.quote, quantity=order.quantity, status=answer.status, reason=answer.reason,
                price=answer.price, spent=answer.spent, received=answer.received, created_at=time.time(),
            ))
            return answer

    def orders(self, account: str) -> list[ActionResponse]:
        """Every order of ``account``, oldest first."""
        with self.sessions() as session:
            rows = session.scalars(select(OrderRow).where(OrderRow.account == account)
                                   .order_by(OrderRow.created_at))
            return [row.response() for row in rows]


def open_paper(settings: AgentSettings) -> PaperExchange:
    """The configured paper exchange, with the agent's account opened (funded once, on first use)."""
    exchange = PaperExchange.open(settings.exchange_url, FixedPrice(settings.agent_price))
    exchange.open_account(settings.agent_exchange_account,
                          {settings.agent_quote_token: settings.agent_exchange_deposit,
                           settings.agent_trade_token: 0})
    return exchange
