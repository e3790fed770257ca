"""The paper exchange on SQLite and PostgreSQL: fills, rejections with reasons, idempotent orders."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from agent.exchange import FILLED, REJECTED, ActionResponse, FixedPrice, Order, PaperExchange, fill
from tests.agent.conftest import PRICE


def buy(order_id: str, quantity: int, account: str = "acct") -> Order:
    return Order(account=account, order_id=order_id, quantity=quantity, trade="LLAMA", quote="CRED")


def test_fill_buys_whole_units_and_keeps_the_remainder():
    assert fill(buy("o1", 1_100), 250, 5_000) == ActionResponse("o1", FILLED, "", 250, 1_000, 4)


def test_fill_rejects_with_the_reason():
    assert fill(buy("o1", 100), 250, 5_000).reason == "100 CRED buys no LLAMA at price 250"
    assert fill(buy("o1", 1_000), 250, 999).reason == "insufficient CRED: has 999, needs 1000"
    assert fill(buy("o1", 0), 250, 999).reason == "quantity must be positive, got 0"
    assert fill(buy("o1", 1_000), 0, 999).status == REJECTED


def test_a_filled_order_moves_both_balances(exchange: PaperExchange):
    assert exchange.open_account("acct", {"CRED": 10_000, "LLAMA": 0})
    answer = exchange.create_order(buy("o1", 1_000))
    assert answer.filled and (answer.spent, answer.received, answer.price) == (1_000, 4, PRICE)
    assert exchange.balances("acct") == {"CRED": 9_000, "LLAMA": 4}
    assert exchange.order_status("acct", "o1") == answer


def test_opening_an_account_twice_funds_it_once(exchange: PaperExchange):
    assert exchange.open_account("acct", {"CRED": 10_000})
    assert not exchange.open_account("acct", {"CRED": 10_000})
    assert exchange.balances("acct") == {"CRED": 10_000}


def test_the_same_order_id_fills_once(exchange: PaperExchange):
    exchange.open_account("acct", {"CRED": 10_000})
    first = exchange.create_order(buy("o1", 1_000))
    again = exchange.create_order(buy("o1", 1_000))
    assert again == first
    assert exchange.balances("acct")["CRED"] == 9_000 and len(exchange.orders("acct")) == 1


def test_a_rejected_order_moves_nothing_and_is_remembered(exchange: PaperExchange):
    exchange.open_account("acct", {"CRED": 500})
    answer = exchange.create_order(buy("o1", 1_000))
    assert answer.status == REJECTED and answer.reason == "insufficient CRED: has 500, needs 1000"
    assert exchange.balances("acct") == {"CRED": 500}
    assert exchange.order_status("acct", "o1") == answer
    assert exchange.order_status("acct", "never") is None


def test_concurrent_duplicates_of_one_order_fill_it_once(exchange: PaperExchange, db_url: str):
    exchange.open_account("acct", {"CRED": 10_000})
    others = [PaperExchange.open(db_url, FixedPrice(PRICE)) for _ in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda x: x.create_order(buy("same", 1_000)), others))
    finally:
        for x in others:
            x.close()
    assert all(a == answers[0] for a in answers) and answers[0].filled
    assert exchange.balances("acct") == {"CRED": 9_000, "LLAMA": 4}


def test_concurrent_orders_never_overdraw(exchange: PaperExchange, db_url: str):
    exchange.open_account("acct", {"CRED": 2_500})
    others = [PaperExchange.open(db_url, FixedPrice(PRICE)) for _ in range(4)]
    try:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda ix: ix[1].create_order(buy(f"o{ix[0]}", 1_000)), enumerate(others)))
    finally:
        for x in others:
            x.close()
    assert sum(a.filled for a in answers) == 2
    assert exchange.balances("acct") == {"CRED": 500, "LLAMA": 8}
