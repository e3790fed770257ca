"""The herder's exception tree: every refusal a requester can meet.

Like the worker's errors, each carries its facts as constructor arguments;
the gateway maps them to HTTP statuses in one table, by type.
"""

from __future__ import annotations

from llama_tasks.errors import LlamasError


class HerderError(LlamasError):
    """Raised when the herder refuses or cannot complete an operation."""


class LedgerError(HerderError):
    """Raised when a ledger operation cannot be carried out."""


class UnknownAccount(LedgerError):
    """Raised when an account name or API key matches no account."""

    fields = ("account",)
    template = "no such account: {account}"


class AccountExists(LedgerError):
    """Raised when creating an account whose name is taken."""

    fields = ("account",)
    template = "account {account!r} already exists"


class InvalidAmount(LedgerError):
    """Raised when an amount is not a positive integer."""

    fields = ("amount",)
    template = "amount must be a positive integer, got {amount!r}"


class InsufficientFunds(LedgerError):
    """Raised when a balance is below the amount to move."""

    fields = ("account", "balance", "needed")
    template = "account {account} has {balance}, needs {needed}"


class BooksUnbalanced(LedgerError):
    """Raised when the ledger check finds balances that transfers do not explain."""

    fields = ("problems",)
    template = "the books do not balance: {problems}"


class SystemAccount(LedgerError):
    """Raised when a requester-only operation names a system account (world, escrow, revenue)."""

    fields = ("account",)
    template = "{account!r} is a system account; only requester accounts can do that"


class InvalidAccountName(LedgerError):
    """Raised when a new account's name is empty, too long or not printable."""

    fields = ("account", "reason")
    template = "invalid account name {account!r}: {reason}"


class HoldExceeded(LedgerError):
    """Raised when a capture or release would take more than a job still holds."""

    fields = ("job_id", "held", "needed")
    template = "job {job_id} holds {held}, cannot take {needed}"
