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


# --- admission: nothing is held when any of these is raised ------------------


class AdmissionError(HerderError):
    """Raised when a request is refused before any money moves."""


class InvalidOffer(AdmissionError):
    """Raised when the fee or multiplier offered is not a usable number."""

    fields = ("reason",)
    template = "invalid offer: {reason}"


class InsufficientFee(AdmissionError):
    """Raised when the offer is below the quote; carries what is needed (``X-Needed``)."""

    fields = ("needed", "offered")
    template = "Insufficient payment: offered {offered}, needed {needed}"


class QueueFull(AdmissionError):
    """Raised when the queue holds its configured maximum of jobs."""

    fields = ("queued", "limit")
    template = "queue full: {queued} jobs waiting (limit {limit}); try again later"


class OverLimit(AdmissionError):
    """Raised when an account is over one of its fair-share limits; it may try again after ``retry_after_s``."""

    fields = ("limit", "allowed", "retry_after_s")
    template = "over this account's {limit} limit of {allowed}; try again in {retry_after_s} s"


class AccountQueueFull(OverLimit):
    """Raised when an account already has its limit of jobs waiting in the queue."""


class RateLimited(OverLimit):
    """Raised when admitting a request would take an account past its requests or tokens per minute."""


class OverRequestLimit(AdmissionError):
    """Raised when one request needs more than its account may ever be admitted at once (n × max_tokens, or
    more tokens than its tokens per minute): waiting would not help."""

    fields = ("limit", "requested", "allowed")
    template = "this request needs {requested} for {limit}; this account's limit is {allowed}"


class UnknownModelRequested(AdmissionError):
    """Raised when a request names a model the herder does not know."""

    fields = ("model", "known")
    template = "unknown model {model!r}; available: {known}"


class RequestTooLarge(AdmissionError):
    """Raised when a request's prompt, messages or grammar exceed the size limit."""

    fields = ("size_bytes", "limit_bytes")
    template = "request of {size_bytes} bytes exceeds the limit of {limit_bytes} bytes"


class ReferenceConflict(AdmissionError):
    """Raised when a reused reference comes with different parameters."""

    fields = ("reference", "job_id")
    template = "reference {reference!r} was used for job {job_id} with different parameters"


class BadReference(AdmissionError):
    """Raised when an idempotency reference is not text of 1 to ``limit`` characters."""

    fields = ("reference", "limit")
    template = "reference must be text of 1 to {limit} characters, got {reference!r}"


class BadDeadline(AdmissionError):
    """Raised when a deadline is not a positive number of seconds."""

    fields = ("deadline_s",)
    template = "deadline_s must be a positive number of seconds, got {deadline_s!r}"


class BadChannel(AdmissionError):
    """Raised when a callback or webhook cannot be used."""

    fields = ("reason",)
    template = "bad response channel: {reason}"


class MalformedBody(AdmissionError):
    """Raised when an HTTP request body is not a JSON object in UTF-8."""

    fields = ("reason",)
    template = "malformed request body: {reason}"


class UnsupportedParameter(AdmissionError):
    """Raised when a request sets a parameter the service does not honour."""

    fields = ("param", "reason")
    template = "unsupported parameter {param!r}: {reason}"


# --- jobs after admission ----------------------------------------------------


class JobError(HerderError):
    """Raised when an operation on an admitted job cannot be done."""


class UnknownJob(JobError):
    """Raised when no job with that id belongs to the requester."""

    fields = ("job_id",)
    template = "no such job: {job_id}"


class JobNotQueued(JobError):
    """Raised when cancelling or re-bidding a job that already left the queue."""

    fields = ("job_id", "state")
    template = "job {job_id} is {state}, not queued"


class JobFailed(JobError):
    """Raised by a handle's ``result()`` when the job ended without an answer."""

    fields = ("job_id", "state", "error", "message")
    template = "job {job_id} {state}: {error}: {message}"


class StreamRestarted(JobError):
    """Raised by a handle's ``stream()`` when a job's text starts over.

    Its worker was lost and the attempt that ran again wrote different text:
    what the stream showed is void. ``stream()`` again follows the new attempt
    from its beginning; ``result()`` gives the final text.
    """

    fields = ("job_id", "attempt")
    template = "job {job_id}: the worker was lost and attempt {attempt} started the text over"


class ResultTimeout(JobError):
    """Raised when a job's response does not arrive in time."""

    fields = ("job_id", "timeout_s")
    template = "no response for job {job_id} within {timeout_s}s"


class NoWorkers(AdmissionError):
    """Raised when no live worker serves the requested model."""

    fields = ("model",)
    template = "no worker is serving model {model!r} right now"


class WebhookTargetRefused(BadChannel):
    """Raised when a webhook's host is, or resolves to, an address that is not public.

    Loopback, link-local, private, multicast, reserved and unspecified
    addresses are refused unless the admin allows the host
    (``LLAMAS_WEBHOOK_ALLOW_HOSTS``); delivery checks again when it connects.
    """

    # mypy takes BadChannel's one-field tuple as the type of every subclass's fields.
    fields = ("host", "reason")  # type: ignore[assignment]
    template = "webhook host {host!r} is refused: {reason}"


# --- receipts ------------------------------------------------------------------


class JobNotFinished(JobError):
    """Raised when a receipt is asked for a job that has not ended (it is queued or running)."""

    fields = ("job_id", "state")
    template = "job {job_id} is {state}: its receipt is issued once it has ended"


class ReceiptMismatch(JobError):
    """Raised when a job's row and its ledger transfers disagree, so no true receipt can be signed."""

    fields = ("job_id", "figure", "job_row", "ledger")
    template = "job {job_id}: {figure} is {job_row} on the job but {ledger} in the ledger; no receipt signed"


class InvalidReceipt(HerderError):
    """Raised when a receipt fails verification; ``check`` names the check: shape, key_id, signature, kind or version."""

    fields = ("check", "reason")
    template = "invalid receipt ({check}): {reason}"


# --- operators ---------------------------------------------------------------


class UnknownOperator(LedgerError):
    """Raised when a name matches no registered operator."""

    fields = ("operator",)
    template = "no such operator: {operator}"


class OperatorExists(LedgerError):
    """Raised when registering an operator whose name is taken."""

    fields = ("operator",)
    template = "operator {operator!r} is already registered"


class InvalidPublicKey(LedgerError):
    """Raised when an operator's public key is not a raw Ed25519 key in base64 (or a PEM public key)."""

    fields = ("reason",)
    template = "invalid public key: {reason}"


# --- broker users --------------------------------------------------------------


class BrokerUserExists(LedgerError):
    """Raised when issuing a broker credential whose user is active (revoke it first)."""

    fields = ("user",)
    template = "broker user {user!r} exists; revoke it first (`llamas broker revoke {user}`)"


class UnknownBrokerUser(LedgerError):
    """Raised when a name matches no active broker user."""

    fields = ("user",)
    template = "no such active broker user: {user}"


# --- data at rest ------------------------------------------------------------


class SecretUnreadable(HerderError):
    """Raised when a sealed secret in the ledger cannot be opened with this process's secrets key."""

    fields = ("reason",)
    template = ("a sealed secret cannot be opened: {reason} (is LLAMAS_SECRETS_KEY, or <home>/secrets.key, "
                "the key it was sealed with?)")


# --- the gateway's own limits --------------------------------------------------


class BodyTooLarge(AdmissionError):
    """Raised when an HTTP request body is longer than the gateway accepts (413, the rest unread)."""

    fields = ("limit_bytes",)
    template = "the request body exceeds the limit of {limit_bytes} bytes"


class BodyTooComplex(MalformedBody):
    """Raised when a JSON body nests deeper, or holds a longer string, than the gateway parses."""

    # mypy takes MalformedBody's one-field tuple as the type of every subclass's fields.
    fields = ("what", "found", "limit")  # type: ignore[assignment]
    template = "the body's {what} is {found}, over the limit of {limit}"


class NumberOutOfRange(AdmissionError):
    """Raised when a number in a request cannot be held (too many digits, or no finite value)."""

    fields = ("reason",)
    template = "number out of range: {reason}"


class TooManyStreams(AdmissionError):
    """Raised when a key already holds as many server-sent-event streams as one key may."""

    fields = ("limit",)
    template = "this key already holds {limit} open event streams; close one first"


# --- the herd: telling a worker which model to serve --------------------------


class HerdError(HerderError):
    """Raised when an Init cannot be sent, or its worker refused it."""


class UnknownWorker(HerdError):
    """Raised when an Init names a worker with no live heartbeat."""

    fields = ("worker", "live")
    template = "no live worker named {worker!r} (live: {live})"


class UnknownModelId(HerdError):
    """Raised when an Init names a model neither registered by name nor by sha256."""

    fields = ("model",)
    template = "no registered model is named {model!r} or has that sha256 (`llamas models list`)"


class InitRefused(HerdError):
    """Raised when the worker refused an Init; it keeps serving what it had."""

    fields = ("worker", "model", "reason")
    template = "worker {worker} refused to serve {model}: {reason}"


class InitTimedOut(HerdError):
    """Raised when a worker did not report an Init's outcome in time (it may still be loading)."""

    fields = ("worker", "model", "waited_s", "last")
    template = "worker {worker} has not reported serving {model} after {waited_s:.0f}s (last seen: {last})"


class ModelNotPermitted(HerdError):
    """Raised when an Init would move an operator's worker to a model its broker credential does not reach."""

    fields = ("worker", "model")
    template = ("worker {worker}'s operator may not serve {model} (its broker user names other models: "
                "`llamas broker operator` to change that)")
