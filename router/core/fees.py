"""Fee arithmetic, in integers of the smallest money unit.

A quote is ``base_fee + fee_per_token × (prompt_tokens + n × max_tokens)``:
the worst case, every one of the ``n`` completions running to ``max_tokens``
and no prompt token found in a worker's cache. A requester offers a fee at
least the quote, or a multiplier of it; on completion it pays the same
multiplier of what it actually used (``cost``), where prompt tokens a worker
reused from its prompt cache may cost less.
"""

from __future__ import annotations

import math
from decimal import Decimal, InvalidOperation

from router.core.errors import InvalidOffer

#: Largest amount a BIGINT balance column can hold, in the smallest money unit.
MAX_AMOUNT = 2**63 - 1

#: Bids are kept as multipliers in millionths, an integer.
PPM = 1_000_000


def quote(base_fee: int, fee_per_token: int, prompt_tokens: int, tokens: int, n: int = 1) -> int:
    """The fee for a prompt of ``prompt_tokens`` and ``n`` completions of up to ``tokens`` each."""
    return base_fee + fee_per_token * (prompt_tokens + n * tokens)


def embedding_quote(base_fee: int, fee_per_embedding_token: int, input_tokens: int) -> int:
    """The fee for embedding inputs of ``input_tokens`` tokens in all: also exactly what they cost.

    Nothing about an embedding is unknown before it runs (no completion,
    no cache), so the quote is its actual cost and the charge is the offer.
    """
    return base_fee + fee_per_embedding_token * input_tokens


def cost(base_fee: int, fee_per_token: int, fee_per_cached_token: int, prompt_tokens: int,
         cached_tokens: int, completion_tokens: int) -> int:
    """What a finished job used: its fresh prompt and completion tokens, and its cached prompt tokens.

    ``completion_tokens`` is the sum over every completion; ``cached_tokens``
    must already lie in ``[0, prompt_tokens]``. With ``fee_per_cached_token``
    at most ``fee_per_token`` this never exceeds the quote of the same tokens.
    """
    fresh = prompt_tokens - cached_tokens
    return base_fee + fee_per_token * (fresh + completion_tokens) + fee_per_cached_token * cached_tokens


def offer(quoted: int, fee: int | None, multiplier: float | str | None) -> int:
    """What a requester offers: its explicit fee, or ``ceil(multiplier × quote)``."""
    if fee is not None and multiplier is not None:
        raise InvalidOffer("give a fee or a multiplier, not both")
    if fee is not None:
        if isinstance(fee, bool) or not isinstance(fee, int) or fee <= 0:
            raise InvalidOffer(f"fee must be a positive integer, got {fee!r}")
        return _fits(fee, quoted)
    try:
        m = Decimal(str(1 if multiplier is None else multiplier))
    except InvalidOperation:
        raise InvalidOffer(f"multiplier must be a number, got {_shown(multiplier)}") from None
    if not m.is_finite() or m <= 0:
        raise InvalidOffer(f"multiplier must be positive, got {_shown(multiplier)}")
    if m > MAX_AMOUNT:
        # No quote (at least 1) times this fits a BIGINT; refused before ``ceil``
        # would build an integer of ``m``'s size ("1e999999999": a billion digits).
        raise InvalidOffer(f"multiplier must be at most {MAX_AMOUNT}, got {_shown(multiplier)}")
    # Decimal, not float: 1.1 × 100 must be 110, not 111.
    return _fits(math.ceil(m * quoted), quoted)


def _shown(value: object) -> str:
    """A refused value as an error quotes it: a long one cut short (errors are logged and sent back)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


def _fits(offered: int, quoted: int) -> int:
    # Past this the hold, or the bid in millionths, no longer fits a BIGINT:
    # refuse it as an offer rather than fail in the database after holding.
    if offered > MAX_AMOUNT or (quoted > 0 and bid_ppm(offered, quoted) > MAX_AMOUNT):
        raise InvalidOffer(f"an offer of {offered} on a quote of {quoted} is too large")
    return offered


def bid_ppm(offered: int, quoted: int) -> int:
    """The multiplier an offer amounts to, in millionths (rounded down)."""
    return offered * PPM // quoted


def charge(offered: int, quoted: int, actual: int) -> int:
    """What a finished job pays: its multiplier times the actual cost, at most the hold.

    ``offered × actual // quoted`` is the multiplier applied exactly in
    integers; rounding down favours the requester.
    """
    return min(offered, offered * actual // quoted)
