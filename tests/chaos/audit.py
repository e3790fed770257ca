"""What must hold after every chaos scenario, read from the ledger itself, and the summary table.

After a scenario the service is drained (polled until no job is queued or
running), then the books are audited: they balance, no balance is
negative, every finished job holds nothing in escrow and was captured at
most once, every admitted job ended in exactly one final state with its
money accounted for, every channel got its response at most once, the
gateway answered no 5xx, and no prompt (nor any long completion) reached a
log.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from sqlalchemy import select

from router.core import ledger, settlement, views
from router.core.models import DONE, OPEN_STATES, WORLD, Account, JobRow, Transfer
from tests.chaos.harness import MARKER, SETTLE_S, ChaosStack
from tests.processes import poll
from tests.router.requester_app import RECEIVED_KEY

#: A status line of uvicorn's access log: ``"POST /v1/completions HTTP/1.1" 500``.
ACCESS_STATUS = re.compile(r'"[A-Z]+ \S+ HTTP/[\d.]+" (\d{3})')
#: What uvicorn logs when a request crashed: after a 500, or inside a stream that had already answered 200.
CRASH_LINE = "Exception in ASGI application"
#: Completions at least this long are looked for in the logs (shorter ones may occur by chance).
MIN_COMPLETION_CHARS = 24


@dataclass
class Row:
    """One line of the summary table."""

    scenario: str
    requests: int = 0
    lost: int = 0
    double_charged: int = 0
    double_delivered: int = 0
    http_5xx: int = 0
    log_leaks: int = 0
    #: Measured from the requesters' side, by scenarios that follow each requester (else None).
    answers_lost: int | None = None
    answers_duplicated: int | None = None
    #: Seconds from the fault to each requester's answer.
    answer_waits: list[float] | None = None

    def cells(self) -> list[str]:
        counts = (self.requests, self.lost, self.double_charged, self.double_delivered, self.http_5xx,
                  self.log_leaks, self.answers_lost, self.answers_duplicated)
        return [self.scenario, *("—" if v is None else str(v) for v in counts), self.waits()]

    def waits(self) -> str:
        """Time to answer after the fault, p50 / max, as the table shows it."""
        if not self.answer_waits:
            return "—"
        return f"{statistics.median(self.answer_waits):.1f} / {max(self.answer_waits):.1f}"


#: Rows of every scenario this session audited, in order.
RESULTS: list[Row] = []
HEADER = ["scenario", "requests", "lost", "double-charged", "double-delivered", "5xx", "prompt/text in logs",
          "answers lost", "answers duplicated", "time to answer after the fault, s (p50 / max)"]


@dataclass
class Scenario:
    """One scenario's window on the stack: what it sent, what the gateway answered, where the logs stood."""

    stack: ChaosStack
    title: str
    start_seq: int = 0
    requests: int = 0
    #: Readers that were shown a job's text twice (or text that is not the stored answer).
    duplicated_streams: int = 0
    statuses: list[int] = field(default_factory=list)
    log_offsets: dict[Path, int] = field(default_factory=dict)
    #: What each requester got, for scenarios that follow them (``requester``).
    answers_lost: int | None = None
    answers_duplicated: int | None = None
    answer_waits: list[float] | None = None

    def __post_init__(self) -> None:
        self.start_seq = self.stack.last_seq()
        self.log_offsets = {p: p.stat().st_size for p in self.stack.logs()}

    def requester(self, lost: bool, duplicated: bool, wait_s: float | None) -> None:
        """Count one requester's outcome: no (or a wrong) answer, more than one, and how
        long after the fault its answer came (None: it has none)."""
        self.answers_lost = (self.answers_lost or 0) + lost
        self.answers_duplicated = (self.answers_duplicated or 0) + duplicated
        self.answer_waits = self.answer_waits or []
        if wait_s is not None:
            self.answer_waits.append(wait_s)

    def sent(self, n: int = 1) -> None:
        """Count requests the scenario made (HTTP, client or raw envelopes)."""
        self.requests += n

    def http(self, timeout_s: float = 120.0) -> httpx.Client:
        """A client of the gateway that records every status it gets (one per thread)."""
        return httpx.Client(base_url=self.stack.gateway, timeout=timeout_s,
                            event_hooks={"response": [self._seen]})

    def _seen(self, response: httpx.Response) -> None:
        self.statuses.append(response.status_code)

    # --- the audit ----------------------------------------------------------------------

    def finish(self) -> tuple[Row, list[str]]:
        """Drain, audit, and return the table row and every problem found."""
        problems: list[str] = []
        # Whatever is still open after this is reported as lost, not failed here.
        poll(lambda: not self.stack.open_jobs(), SETTLE_S, every_s=0.2)
        row = Row(self.title, requests=self.requests, answers_lost=self.answers_lost,
                  answers_duplicated=self.answers_duplicated, answer_waits=self.answer_waits)
        self._books(row, problems)
        self._deliveries(row, problems)
        self._gateway(row, problems)
        self._logs(row, problems)
        row.double_delivered += self.duplicated_streams
        if self.duplicated_streams:
            problems.append(f"{self.duplicated_streams} stream reader(s) were shown text twice or wrong text")
        return row, problems

    def _books(self, row: Row, problems: list[str]) -> None:
        with self.stack.sessions.begin() as s:
            problems += [f"ledger.check: {p}" for p in ledger.check(s)]
            for name, balance in s.execute(select(Account.name, Account.balance)):
                if balance < 0 and name != WORLD:
                    problems.append(f"account {name}: negative balance {balance}")
            kinds: Counter[tuple[str, str]] = Counter()
            net: Counter[str] = Counter()
            for job_id, kind, amount in s.execute(
                select(Transfer.job_id, Transfer.kind, Transfer.amount).where(Transfer.job_id.is_not(None))
            ):
                kinds[str(job_id), kind] += 1
                net[str(job_id)] += amount if kind == "hold" else -amount
            for job in s.scalars(select(JobRow)):
                mine = job.seq > self.start_seq
                if job.state in OPEN_STATES:
                    problems.append(f"job {job.id} still {job.state} {SETTLE_S:.0f}s after the scenario")
                    row.lost += mine
                    continue
                if net[job.id] != 0:
                    problems.append(f"job {job.id} ({job.state}) still holds {net[job.id]} in escrow")
                if kinds[job.id, "capture"] > 1 or (not settlement.chargeable(job) and kinds[job.id, "capture"]):
                    problems.append(f"job {job.id} ({job.state}) captured {kinds[job.id, 'capture']} times")
                    row.double_charged += mine
                if kinds[job.id, "release"] > 1:
                    problems.append(f"job {job.id} refunded {kinds[job.id, 'release']} times: it ended twice")
                if job.charged is None or job.refunded is None or job.charged + job.refunded != job.offered:
                    problems.append(f"job {job.id} ({job.state}): charged {job.charged} + refunded "
                                    f"{job.refunded} is not its offer {job.offered}")
                if not settlement.chargeable(job) and job.charged:
                    problems.append(f"job {job.id} ended {job.state} but was charged {job.charged}")
                if job.state == DONE and views.response(job)["text"] is None:
                    problems.append(f"job {job.id} was charged without a stored result")
                    row.lost += mine

    def _deliveries(self, row: Row, problems: list[str]) -> None:
        with self.stack.sessions.begin() as s:
            marked = list(s.execute(select(JobRow.id, JobRow.delivered).where(JobRow.seq > self.start_seq)))
        for job_id, delivered in marked:
            channels = Counter(c for c in delivered.split(",") if c)
            twice = [c for c, n in channels.items() if n > 1]
            if twice:
                problems.append(f"job {job_id}: channel(s) {twice} marked delivered more than once")
                row.double_delivered += 1
        mine = {job_id for job_id, _ in marked}
        received = Counter(json.loads(r)["job_id"] for r in self.stack.r.lrange(RECEIVED_KEY, 0, -1))
        for job_id, n in received.items():
            if job_id in mine and n > 1:
                problems.append(f"job {job_id}: the requester's callback received its response {n} times")
                row.double_delivered += 1

    def _new_log_text(self, path: Path) -> str:
        with open(path, "rb") as f:
            f.seek(self.log_offsets.get(path, 0))
            return f.read().decode("utf-8", "replace")

    def _gateway(self, row: Row, problems: list[str]) -> None:
        gateway_log = self.stack.tmp / "gateway.log"
        text = self._new_log_text(gateway_log) if gateway_log.exists() else ""
        logged = [int(code) for code in ACCESS_STATUS.findall(text) if code.startswith("5")]
        crashes = text.count(CRASH_LINE)
        seen = [code for code in self.statuses if code >= 500]
        # The access log also has answers to clients that already left; the crash lines, streams that broke after a 200.
        row.http_5xx = max(len(logged), len(seen), crashes)
        if row.http_5xx:
            problems.append(f"the gateway answered 5xx: {len(seen)} seen by clients ({sorted(set(seen))}), "
                            f"{len(logged)} in its access log, {crashes} crash traceback(s) in gateway.log")

    def _logs(self, row: Row, problems: list[str]) -> None:
        found, leaks = self.log_leaks()
        row.log_leaks += found
        problems += leaks

    def log_leaks(self) -> tuple[int, list[str]]:
        """(how many, which) prompts and long completions of this scenario reached a log so far."""
        found, leaks = 0, []
        with self.stack.sessions.begin() as s:
            texts = [t for t in (views.response(row)["text"] for row in s.scalars(select(JobRow).where(
                JobRow.seq > self.start_seq, JobRow.state == DONE)))
                if t and len(t.strip()) >= MIN_COMPLETION_CHARS]
        for path in self.stack.logs():
            text = self._new_log_text(path)
            prompts = text.count(MARKER)
            completions = sum(1 for t in texts if t in text)
            if prompts or completions:
                line = next((ln for ln in text.splitlines() if MARKER in ln or any(t in ln for t in texts)), "")
                leaks.append(f"{path.name}: {prompts} prompt(s), {completions} completion(s); e.g. {line[:300]!r}")
                found += prompts + completions
        return found, leaks


def table(rows: list[Row]) -> list[str]:
    """The rows as a Markdown table."""
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" + "---:|" * (len(HEADER) - 1)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return lines


def write_results(rows: list[Row], path: Path, mode: str, outcome: dict[str, Any]) -> None:
    """Write the latest table, with when and how it was run, for the README to quote."""
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    totals = Row("**total**")
    for r in rows:
        for name in ("requests", "lost", "double_charged", "double_delivered", "http_5xx", "log_leaks"):
            setattr(totals, name, getattr(totals, name) + getattr(r, name))
        for name in ("answers_lost", "answers_duplicated"):
            if getattr(r, name) is not None:
                setattr(totals, name, (getattr(totals, name) or 0) + getattr(r, name))
        if r.answer_waits:
            totals.answer_waits = (totals.answer_waits or []) + r.answer_waits
    lines = [
        "# Chaos suite: latest results",
        "",
        f"Run {when}, {mode} (`{outcome['command']}`): {outcome['summary']}.",
        "",
        "Every row is audited from the ledger after the scenario drained: *lost* = admitted jobs that",
        "never reached a final state or were charged without a stored result; *double-charged* = jobs",
        "captured more than once; *double-delivered* = a channel (handle, callback, stream reader) that",
        "got a response or text twice; *5xx* = gateway answers of 500 and up (or crashed streams);",
        "*prompt/text in logs* = prompts (all carry a marker) or completions found in any log.",
        "The last three columns are measured from the requesters' side, in the scenarios that follow",
        "each requester (the crash points, the herder killed as it settles): *answers lost* = requesters",
        "that got no answer, or one that is not the stored text; *answers duplicated* = requesters that",
        "acted on an answer twice (a callback receiver drops a repeated delivery by its job id, a stream",
        "reader was shown text twice); *time to answer* = from the fault to each requester's answer.",
        "",
        *table([*rows, totals]),
        "",
    ]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
