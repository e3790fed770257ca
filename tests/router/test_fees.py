"""Fees: the quote counts real tokens, offers are exact, and a charge never exceeds its hold."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from llama_tasks.job import Job
from router.core import fees
from router.core.errors import InvalidOffer
from router.herder.tokens import TokenCounter

from .conftest import Herder


def counted(counter: TokenCounter, **fields: Any) -> int:
    """Prompt tokens of a job as the worker will feed them, from the counter itself."""
    job = Job(job_id="j", attempt=0, model="smollm2", max_tokens=1, expires_at=0.0,
              issued_at=0.0, **fields)
    return counter.prompt_tokens(job)


# --- the quote ---------------------------------------------------------------


def test_quote_is_base_fee_plus_fee_per_token_times_all_tokens() -> None:
    assert fees.quote(5, 2, 10, 20) == 5 + 2 * 30
    assert fees.quote(0, 1, 1, 1) == 2
    assert fees.quote(7, 0, 100, 100) == 7


@pytest.mark.parametrize(
    "request_fields",
    [
        pytest.param({"prompt": "Internationalization of antidisestablishmentarianism."}, id="raw"),
        pytest.param(
            {"messages": [{"role": "system", "content": "Grade sentiment."},
                          {"role": "user", "content": "Llamas are wonderful!"}]},
            id="chat",
        ),
    ],
)
def test_admission_quotes_the_models_own_token_count(
    herder: Herder, request_fields: dict[str, Any]
) -> None:
    herder.configure(base_fee=11, fee_per_token=3)
    key = herder.account("alice", deposit=10_000)

    row = herder.submit(key, max_tokens=16, **request_fields)

    prompt_tokens = counted(herder.counter, **request_fields)
    assert row.prompt_tokens == prompt_tokens
    assert row.quote == 11 + 3 * (prompt_tokens + 16)
    assert row.offered == row.quote  # multiplier 1 by default
    assert herder.balance("alice") == 10_000 - row.quote
    herder.assert_books()


def test_token_counts_are_tokens_of_the_formatted_prompt_not_words(counter: TokenCounter) -> None:
    text = "Internationalization of antidisestablishmentarianism."
    raw = counted(counter, prompt=text)
    chat = counted(counter, messages=[{"role": "user", "content": text}])
    assert raw > len(text.split())  # subword tokens, not words
    # The chat template wraps the message in role markers, all of them counted.
    assert chat > raw + 4


# --- offers ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("quoted", "multiplier", "offered"),
    [
        (100, None, 100),
        (100, 1.1, 110),  # a float's shortest repr, not its binary value: 110.00000000000001 would be 111
        (100, "1.1", 110),
        (1000, 1.15, 1150),
        (3, 1.5, 5),  # 4.5 rounds up: an offer never falls short of its multiplier
        (7, 2, 14),
        (10**12, "1.000001", 10**12 + 10**6),
    ],
)
def test_offer_from_a_multiplier_is_exact(quoted: int, multiplier: Any, offered: int) -> None:
    assert fees.offer(quoted, None, multiplier) == offered


def test_offer_from_a_fee_is_the_fee() -> None:
    assert fees.offer(100, 250, None) == 250
    assert fees.offer(100, 40, None) == 40  # below the quote: admission refuses it, not offer()


@pytest.mark.parametrize(
    ("fee", "multiplier"),
    [(100, 1.0), (0, None), (-5, None), (True, None), (10.0, None), ("100", None),
     (None, 0), (None, -1), (None, "abc"), (None, "NaN"), (None, "Infinity"), (None, True)],
)
def test_unusable_offers_are_refused(fee: Any, multiplier: Any) -> None:
    with pytest.raises(InvalidOffer):
        fees.offer(100, fee, multiplier)


def test_bid_is_the_offers_multiplier_in_millionths() -> None:
    assert fees.bid_ppm(110, 100) == 1_100_000
    assert fees.bid_ppm(100, 100) == fees.PPM
    assert fees.bid_ppm(2, 3) == 666_666  # rounded down


# --- charges -----------------------------------------------------------------


def test_charge_is_the_multiplier_times_the_actual_cost() -> None:
    # multiplier 1.1 on a quote of 100, half of it used: 1.1 × 50.
    assert fees.charge(110, 100, 50) == 55
    assert fees.charge(100, 100, 37) == 37  # multiplier 1 pays exactly what was used
    assert fees.charge(200, 100, 100) == 200
    assert fees.charge(110, 100, 0) == 0


def test_charge_never_exceeds_the_hold_when_a_worker_overruns() -> None:
    assert fees.charge(110, 100, 150) == 110
    assert fees.charge(100, 100, 10**9) == 100


@given(
    quoted=st.integers(min_value=1, max_value=10**12),
    extra=st.integers(min_value=0, max_value=10**12),
    actual=st.integers(min_value=0, max_value=10**13),
)
def test_charge_is_bounded_and_exact(quoted: int, extra: int, actual: int) -> None:
    offered = quoted + extra
    charged = fees.charge(offered, quoted, actual)
    assert 0 <= charged <= offered
    if actual <= quoted:
        # offered / quoted is the multiplier: the charge is it times the actual cost, rounded down.
        exact = Decimal(offered) * Decimal(actual) / Decimal(quoted)
        assert charged <= exact < charged + 1
    else:
        assert charged == offered


@given(
    quoted=st.integers(min_value=1, max_value=10**9),
    multiplier=st.decimals(min_value="1", max_value="100", places=3),
)
def test_a_multiplier_offer_charges_at_least_that_multiplier_of_a_full_run(
    quoted: int, multiplier: Decimal
) -> None:
    offered = fees.offer(quoted, None, str(multiplier))
    assert multiplier * quoted <= offered < multiplier * quoted + 1
    assert fees.bid_ppm(offered, quoted) >= int(multiplier * fees.PPM)
    assert fees.charge(offered, quoted, quoted) == offered


def test_settings_refuse_fees_that_make_every_quote_zero(tmp_path):
    from pydantic import ValidationError

    from router.core.settings import HerderSettings

    with pytest.raises(ValidationError, match="cannot both be 0"):
        HerderSettings(home=tmp_path, base_fee=0, fee_per_token=0)
    assert HerderSettings(home=tmp_path, base_fee=0, fee_per_token=1).fee_per_token == 1


# --- several completions and cached prompt tokens ------------------------------


def test_the_quote_covers_every_completion_and_assumes_nothing_cached() -> None:
    assert fees.quote(5, 2, 10, 20, n=3) == 5 + 2 * (10 + 3 * 20)
    assert fees.quote(5, 2, 10, 20) == fees.quote(5, 2, 10, 20, n=1) == 65


def test_the_cost_charges_cached_prompt_tokens_at_their_own_fee() -> None:
    # 10 prompt tokens, 4 of them cached at 1 instead of 3; 7 completion tokens over all choices.
    assert fees.cost(5, 3, 1, 10, 4, 7) == 5 + 3 * (6 + 7) + 1 * 4 == 48
    assert fees.cost(5, 3, 3, 10, 4, 7) == fees.quote(5, 3, 10, 7)  # cached at full price: no discount
    assert fees.cost(5, 3, 0, 10, 10, 0) == 5  # a fully cached prompt at a zero fee, nothing generated


@given(
    base=st.integers(0, 1000), per=st.integers(1, 1000), cached_per=st.integers(0, 1000),
    prompt=st.integers(0, 4096), cached=st.integers(0, 4096), max_tokens=st.integers(1, 2048),
    n=st.integers(1, 8), used=st.lists(st.integers(0, 2048), min_size=1, max_size=8),
)
def test_a_cost_within_what_was_asked_never_exceeds_the_quote(
    base: int, per: int, cached_per: int, prompt: int, cached: int, max_tokens: int, n: int, used: list[int]
) -> None:
    cached_per, cached = min(cached_per, per), min(cached, prompt)
    completion = sum(min(u, max_tokens) for u in used[:n])
    assert fees.cost(base, per, cached_per, prompt, cached, completion) <= fees.quote(base, per, prompt, max_tokens, n)


def test_admission_quotes_n_completions_and_records_the_cached_token_fee(herder: Herder) -> None:
    herder.configure(base_fee=11, fee_per_token=3, fee_per_cached_token=1)
    key = herder.account("alice", deposit=10_000)

    row = herder.submit(key, max_tokens=16, n=3, prompt="Name a llama.")

    prompt_tokens = counted(herder.counter, prompt="Name a llama.")
    assert row.quote == 11 + 3 * (prompt_tokens + 3 * 16)
    assert (row.n, row.base_fee, row.fee_per_token, row.fee_per_cached_token) == (3, 11, 3, 1)
    assert herder.balance("alice") == 10_000 - row.quote
    herder.assert_books()


def test_the_cached_token_fee_defaults_to_the_fee_per_token_and_never_exceeds_it(tmp_path: Any) -> None:
    from pydantic import ValidationError

    from router.core.settings import HerderSettings

    assert HerderSettings(home=tmp_path, fee_per_token=4).cached_token_fee == 4
    assert HerderSettings(home=tmp_path, fee_per_token=4, fee_per_cached_token=0).cached_token_fee == 0
    with pytest.raises(ValidationError, match="cannot exceed"):
        HerderSettings(home=tmp_path, fee_per_token=4, fee_per_cached_token=5)
    with pytest.raises(ValidationError):
        HerderSettings(home=tmp_path, fee_per_cached_token=-1)


def test_the_cached_token_fee_is_read_from_the_environment(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from router.core.settings import HerderSettings

    monkeypatch.setenv("LLAMAS_FEE_PER_TOKEN", "6")
    monkeypatch.setenv("LLAMAS_FEE_PER_CACHED_TOKEN", "2")
    settings = HerderSettings(home=tmp_path)
    assert (settings.fee_per_token, settings.fee_per_cached_token, settings.cached_token_fee) == (6, 2, 2)
