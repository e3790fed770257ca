"""Fair shares: each account's limits, counted so that herders and gateways sharing one ledger and one Redis agree.

An account may have at most ``queued`` jobs waiting and its running jobs hold at most ``in_flight``
slots (a job of n choices holds n), may be admitted at most ``requests_per_minute`` requests and
``tokens_per_minute`` tokens (prompt + n × max_tokens, as quoted) in any
60 s, and may ask for at most ``request_tokens`` (n × max_tokens) in one
request. The admin sets an account's own (``AccountLimits``); the rest come
from the settings.

Queued and running jobs are counted in SQL inside the transaction that admits
or claims, under the account's lock on PostgreSQL (admission locks its row,
a claim the account's advisory lock: ``router.core.queue``), and under
``BEGIN IMMEDIATE`` on SQLite. The minute windows are
Redis sorted sets, checked and written by one Lua script, so two admissions
on two gateways can never both take the last request; a refused request
writes nothing, and an admission whose transaction fails afterwards takes its
entry back (``Reservation``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import redis
from sqlalchemy import bindparam, func, select
from sqlalchemy.orm import Session

from router.core.errors import AccountQueueFull, OverRequestLimit, RateLimited, SystemAccount
from router.core.keys import RATE_PREFIX
from router.core.ledger import Requester
from router.core.models import QUEUED, Account, AccountLimits, JobRow
from router.core.settings import HerderSettings

#: The length of the requests- and tokens-per-minute windows.
WINDOW_S = 60
#: What a refusal for a full per-account queue tells the requester to wait:
#: a queued job's departure cannot be foreseen, and one second is a cheap retry.
QUEUE_RETRY_S = 1
#: ``AccountLimits`` columns, by the names ``Limits`` gives them.
COLUMNS = {
    "queued": "max_queued",
    "in_flight": "max_in_flight",
    "requests_per_minute": "requests_per_minute",
    "tokens_per_minute": "tokens_per_minute",
    "request_tokens": "max_request_tokens",
}


@dataclass(frozen=True)
class Limits:
    """The limits in force for one account; a per-minute limit of 0 means none."""

    queued: int
    in_flight: int
    requests_per_minute: int
    tokens_per_minute: int
    request_tokens: int


def defaults(settings: HerderSettings) -> Limits:
    """The limits of an account the admin set none for."""
    return Limits(
        queued=settings.account_max_queued,
        in_flight=settings.account_max_in_flight,
        requests_per_minute=settings.account_requests_per_minute,
        tokens_per_minute=settings.account_tokens_per_minute,
        request_tokens=settings.account_max_request_tokens,
    )


# Built once and run on the connection, as the ledger's statements are: every admission reads it. Only
# ``set_own`` writes the row, and it flushes, so the connection sees what the session holds.
_OWN = select(*(getattr(AccountLimits, column) for column in COLUMNS.values())).where(
    AccountLimits.account_id == bindparam("p_account_id"))


def of(session: Session, settings: HerderSettings, account_id: int) -> Limits:
    """The limits in force for ``account_id``: its own where the admin set them, the settings' elsewhere."""
    base = defaults(settings)
    own = session.connection().execute(_OWN, {"p_account_id": account_id}).one_or_none()
    if own is None:
        return base
    return replace(base, **{name: value for name, value in zip(COLUMNS, own, strict=True) if value is not None})


def own(session: Session, account_id: int) -> dict[str, int]:
    """The limits the admin set for ``account_id`` (only those), by ``Limits`` field name."""
    row = session.get(AccountLimits, account_id)
    if row is None:
        return {}
    return {name: value for name, column in COLUMNS.items() if (value := getattr(row, column)) is not None}


def set_own(session: Session, account: Account, clear: bool = False, **changes: int | None) -> None:
    """Give ``account`` its own limits (``Limits`` field names; None leaves one as it is);
    ``clear`` first drops every limit it had, back to the defaults."""
    unknown = set(changes) - set(COLUMNS)
    if unknown:
        raise TypeError(f"unknown limits: {sorted(unknown)}")
    if account.kind != "user":
        raise SystemAccount(account.name)  # only requesters are admitted, so only they have limits
    row = session.get(AccountLimits, account.id)
    if clear and row is not None:
        session.delete(row)
        session.flush()
        row = None
    given = {name: value for name, value in changes.items() if value is not None}
    if not given:
        return
    if row is None:
        row = AccountLimits(account_id=account.id)
        session.add(row)
    for name, value in given.items():
        setattr(row, COLUMNS[name], value)
    session.flush()


# --- one request ---------------------------------------------------------------


def request_tokens(prompt_tokens: int, max_tokens: int, n: int) -> int:
    """The tokens a request may use, as quoted: its prompt once, and n completions of max_tokens."""
    return prompt_tokens + n * max_tokens


def check_request(limits: Limits, prompt_tokens: int, max_tokens: int, n: int) -> None:
    """Refuse a request no wait would let in: more choices than the account's slots, more n × max_tokens,
    or more tokens, than the account may ever use."""
    if n > limits.in_flight:
        # Each choice is a sequence holding a slot: n of them at once would be past the account's share.
        raise OverRequestLimit("n (slots at once)", n, limits.in_flight)
    work = n * max_tokens
    if work > limits.request_tokens:
        raise OverRequestLimit("n × max_tokens", work, limits.request_tokens)
    tokens = request_tokens(prompt_tokens, max_tokens, n)
    if limits.tokens_per_minute and tokens > limits.tokens_per_minute:
        raise OverRequestLimit("tokens per minute", tokens, limits.tokens_per_minute)


# --- queued and running jobs, in SQL ---------------------------------------------


_QUEUED = (select(func.count(), func.count().filter(JobRow.account_id == bindparam("p_account_id")))
           .select_from(JobRow).where(JobRow.state == QUEUED))


def queued_of(session: Session, account_id: int) -> tuple[int, int]:
    """Jobs waiting in the queue (every model): in all, and the account's, as written so far (on the connection,
    without an autoflush: flush first whatever changes to jobs the session holds)."""
    total, own = session.connection().execute(_QUEUED, {"p_account_id": account_id}).one()
    return int(total or 0), int(own or 0)


def check_queued(queued: int, limits: Limits) -> None:
    """Refuse a new job of an account that already has ``queued`` jobs, its share of the queue.

    Counted in the admission's transaction, under the account's row lock: two
    admissions of one account cannot both see room for one more.
    """
    if queued >= limits.queued:
        raise AccountQueueFull("queued jobs", limits.queued, QUEUE_RETRY_S)


# --- requests and tokens per minute, in Redis ------------------------------------

#: KEYS: the window's sorted set (member ``job|tokens``, score the time in ms)
#: and the sum of its tokens; ARGV: now (ms), window (ms), member, tokens,
#: requests per minute, tokens per minute (0 = no limit), 1 to take or 0 to
#: look. Returns {taken, requests, tokens, reset ms, retry ms}: the window
#: after the call, when it is empty again, and when this request would fit.
#: The running sum keeps an admission O(log n); only a refusal for tokens
#: walks the oldest entries, as far as the request needs.
_WINDOW_LUA = """
local key, sum_key = KEYS[1], KEYS[2]
local now, window = tonumber(ARGV[1]), tonumber(ARGV[2])
local member, tokens = ARGV[3], tonumber(ARGV[4])
local rpm, tpm, take = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7] == '1'
local function size(entry) return tonumber(string.match(entry, '|(%d+)$')) or 0 end
local old = redis.call('ZRANGEBYSCORE', key, '-inf', now - window)
if #old > 0 then
  local freed = 0
  for i = 1, #old do freed = freed + size(old[i]) end
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now - window)
  redis.call('DECRBY', sum_key, freed)
end
local count = redis.call('ZCARD', key)
local used = tonumber(redis.call('GET', sum_key) or '0')
if count == 0 then
  used = 0
  redis.call('DEL', sum_key)
end
local wait = 0
if rpm > 0 and count + 1 > rpm then
  local oldest = redis.call('ZRANGE', key, count - rpm, count - rpm, 'WITHSCORES')
  wait = math.max(wait, tonumber(oldest[2]) + window - now)
end
if tpm > 0 and used + tokens > tpm then
  -- More than the whole window holds never fits (check_request refuses it before this).
  local until_fits, freed, first, found = window, 0, 0, false
  while first < count and not found do
    local page = redis.call('ZRANGE', key, first, first + 99, 'WITHSCORES')
    for i = 1, #page, 2 do
      freed = freed + size(page[i])
      if used - freed + tokens <= tpm then
        until_fits, found = tonumber(page[i + 1]) + window - now, true
        break
      end
    end
    first = first + 100
  end
  wait = math.max(wait, until_fits)
end
local taken = 0
if take and wait == 0 then
  redis.call('ZADD', key, now, member .. '|' .. tokens)
  redis.call('INCRBY', sum_key, tokens)
  redis.call('PEXPIRE', key, window)
  redis.call('PEXPIRE', sum_key, window)
  count, used, taken = count + 1, used + tokens, 1
end
local reset = 0
local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
if #newest > 0 then reset = tonumber(newest[2]) + window - now end
return {taken, count, used, reset, wait}
"""

#: KEYS as above; ARGV: the member. Takes an entry back, and its tokens with it.
_GIVE_BACK_LUA = """
if redis.call('ZREM', KEYS[1], ARGV[1]) == 1 then
  redis.call('DECRBY', KEYS[2], tonumber(string.match(ARGV[1], '|(%d+)$')) or 0)
end
return 0
"""


def window_keys(window: str) -> list[str]:
    """The Redis keys of one window: its entries and its token sum (one hash slot, for a cluster)."""
    return [f"{RATE_PREFIX}{{{window}}}", f"{RATE_PREFIX}{{{window}}}:tokens"]


@dataclass(frozen=True)
class Usage:
    """An account's standing in its minute windows: what the ``x-ratelimit-*`` headers say (0 limit = none)."""

    limit_requests: int
    remaining_requests: int
    reset_requests_s: float
    limit_tokens: int
    remaining_tokens: int
    reset_tokens_s: float


def window_id(account: Account | Requester) -> str:
    """The name of ``account``'s minute window: unique across every ledger that shares the Redis
    (account ids are not), and saying nothing of the key it is derived from."""
    return hashlib.sha256(f"llamas-rate:{account.api_key_hash}".encode()).hexdigest()[:32]


def _retry_s(wait_ms: int) -> int:
    return max(1, math.ceil(wait_ms / 1000))


class Windows:
    """Every account's requests- and tokens-per-minute windows in one Redis; builds without I/O."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._script = client.register_script(_WINDOW_LUA)
        self._give_back = client.register_script(_GIVE_BACK_LUA)

    def _run(self, window: str, member: str, tokens: int, limits: Limits, now: float, take: bool) -> list[int]:
        args: list[int | str] = [int(now * 1000), WINDOW_S * 1000, member, tokens, limits.requests_per_minute,
                                 limits.tokens_per_minute, 1 if take else 0]
        return [int(v) for v in self._script(keys=window_keys(window), args=args)]

    @staticmethod
    def _usage(limits: Limits, result: list[int]) -> Usage:
        _, count, used, reset, _ = result
        return Usage(limits.requests_per_minute, max(0, limits.requests_per_minute - count), reset / 1000,
                     limits.tokens_per_minute, max(0, limits.tokens_per_minute - used), reset / 1000)

    def take(self, window: str, member: str, tokens: int, limits: Limits, now: float) -> Usage:
        """Count one admission of ``tokens`` in the window, or raise ``RateLimited`` having counted nothing."""
        result = self._run(window, member, tokens, limits, now, take=True)
        if not result[0]:
            count, wait = result[1], result[4]
            rpm, tpm = limits.requests_per_minute, limits.tokens_per_minute
            if rpm and count + 1 > rpm:
                raise RateLimited("requests per minute", rpm, _retry_s(wait))
            raise RateLimited("tokens per minute", tpm, _retry_s(wait))
        return self._usage(limits, result)

    def give_back(self, window: str, member: str, tokens: int) -> None:
        """Take back an admission whose transaction did not commit: it never happened."""
        self._give_back(keys=window_keys(window), args=[f"{member}|{tokens}"])

    def usage(self, window: str, limits: Limits, now: float) -> Usage:
        """The window as it stands, counting nothing."""
        return self._usage(limits, self._run(window, "", 0, limits, now, take=False))


class Reservation:
    """The window entries one admission takes, given back unless the admission commits (see ``reserve``)."""

    def __init__(self, windows: Windows) -> None:
        self.windows = windows
        self.taken: list[tuple[str, str, int]] = []
        #: The window as the last take left it: what the admission's ``x-ratelimit-*`` headers say.
        self.usage: Usage | None = None

    def take(self, account: Account | Requester, job_id: str, tokens: int, limits: Limits, now: float) -> Usage:
        window = window_id(account)
        self.usage = self.windows.take(window, job_id, tokens, limits, now)
        self.taken.append((window, job_id, tokens))
        return self.usage

    def give_back(self) -> None:
        for window, member, tokens in self.taken:
            self.windows.give_back(window, member, tokens)
        self.taken.clear()


@contextmanager
def reserve(windows: Windows) -> Iterator[Reservation]:
    """A ``Reservation`` for one admission: wrap the transaction in it, so an
    admission that fails after taking its place in the windows gives it back."""
    reservation = Reservation(windows)
    try:
        yield reservation
    except BaseException:
        try:
            reservation.give_back()
        except redis.RedisError:
            pass  # the entry expires with its window; the refusal in flight matters more
        raise


def headers(usage: Usage) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers; a kind with no limit is left out."""
    out: dict[str, str] = {}
    for kind, limit, remaining, reset in (
        ("requests", usage.limit_requests, usage.remaining_requests, usage.reset_requests_s),
        ("tokens", usage.limit_tokens, usage.remaining_tokens, usage.reset_tokens_s),
    ):
        if limit:
            out[f"x-ratelimit-limit-{kind}"] = str(limit)
            out[f"x-ratelimit-remaining-{kind}"] = str(remaining)
            out[f"x-ratelimit-reset-{kind}"] = _duration(reset)
    return out


def _duration(seconds: float) -> str:
    """A duration as OpenAI writes it in ``x-ratelimit-reset-*``: ``1s``, ``6m0s``, ``0.5s``."""
    if seconds < 60:
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    minutes, rest = divmod(int(math.ceil(seconds)), 60)
    return f"{minutes}m{rest}s"
