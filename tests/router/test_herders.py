"""Two herders share one queue on PostgreSQL; SIGKILL one mid-burst and nothing is lost or charged twice.

Real processes (``tests.bench.fleet``): two herders (``celery -A router
worker -Q herder``, no ``-B``), exactly one ``celery -A router beat``, and
stub workers that answer at once, on one fresh PostgreSQL database. A burst
of client requests, each with its own ``reference``; once results are
arriving and the first herder holds results it has read from the results
stream and not settled (stopped with SIGSTOP to look), its whole process
group is SIGKILLed. A
requester whose call died with that herder (its submit or a status poll
went unanswered) submits again with the same reference, which names the
same job. After the drain: every requester has its one result, the chaos
suite's audit (``tests.chaos.audit``) finds every job ended once, none
charged twice and the books balanced, and no generation whose result was
stored was run a second time (results that died with the herder are settled
from the result store by the tick, and their stream entries are taken over
by the survivor, long before the attempts' leases run out). Finally the dead
herder's Celery messages are redelivered, as Redis does after its visibility
timeout (an hour), and change nothing.
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from celery.exceptions import TimeoutError as CallTimeout
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from llama_tasks.constants import RESULTS_GROUP, RESULTS_STREAM
from router import Herder
from router.client import requester_app
from router.core import ledger
from router.core.db import make_engine, make_sessionmaker, upgrade
from router.core.models import DONE, JobRow
from tests.bench.fleet import Fleet, audit_window
from tests.processes import CeleryProcess, poll, wait_for
from tests.stack import drop_postgres_database, postgres_database

REQUESTS = 48
#: Requesters at once: enough that both herders are busy when one dies.
CONCURRENCY = 12
#: Results that must have arrived before the kill: the burst is under way, most of it still to come.
KILL_AFTER = 10
#: The client's wait for a herder's answer: a call held by the killed herder is given up after this and retried.
RPC_TIMEOUT_S = 5.0
RESULT_TIMEOUT_S = 40.0
#: Short limits so that an attempt lost with the herder is reaped (lease = 8 + 2 s) within the test. The
#: visibility timeout stays at the production default: what a dead herder held comes back only after an hour.
LIMITS = dict(LLAMAS_SOFT_TIME_LIMIT_S="6", LLAMAS_TIME_LIMIT_S="8", LLAMAS_LEASE_GRACE_S="2",
              LLAMAS_VISIBILITY_TIMEOUT_S="3600", LLAMAS_TICK_S="0.5")
#: The herders' consumer group on the results stream (``router.herder.result_reader``).
GROUP = RESULTS_GROUP


@dataclass
class Outcome:
    """What one requester got: its job's response, and how many times it had to submit."""

    reference: str
    job_id: str
    response: dict[str, Any]
    submits: int
    latency_s: float


@pytest.fixture
def fleet(postgres_url: str, redis_url: str, tmp_path: Path) -> Iterator[tuple[Fleet, sessionmaker[Session]]]:
    """Three stub workers, two herders and one beat on a fresh PostgreSQL database, and its sessions."""
    db_url = postgres_database()
    if db_url is None:
        pytest.skip(f"cannot create a database on the PostgreSQL at {postgres_url}")
    upgrade(db_url)
    sessions = make_sessionmaker(make_engine(db_url))
    f = Fleet(dict(os.environ, LLAMAS_DATABASE_URL=db_url, **LIMITS), tmp_path)
    try:
        f.clear_broker()
        f.start_workers(3, threads=2)
        f.start_control(herders=2, concurrency=2)
        yield f, sessions
    finally:
        f.stop()
        sessions.kw["bind"].dispose()
        # What the killed herder held stays unacknowledged for the visibility timeout: not for the next test.
        redis_lib.Redis.from_url(redis_url).delete("herder", "unacked", "unacked_index", RESULTS_STREAM)
        drop_postgres_database(db_url)


def held_results(r: redis_lib.Redis, herder: CeleryProcess) -> set[str]:
    """Generation task ids of the results ``herder`` has read from the results stream and not acknowledged."""
    held = set()
    for consumer in r.xinfo_consumers(RESULTS_STREAM, GROUP):
        name = consumer["name"].decode() if isinstance(consumer["name"], bytes) else consumer["name"]
        if not name.startswith(herder.name + ":") or not consumer["pending"]:
            continue
        for pending in r.xpending_range(RESULTS_STREAM, GROUP, "-", "+", 10_000, consumername=name):
            for _, fields in r.xrange(RESULTS_STREAM, pending["message_id"], pending["message_id"]):
                held.add(json.loads(fields[b"doc"])["task_id"])
    return held


def frozen_holding_results(r: redis_lib.Redis, herder: CeleryProcess) -> set[str]:
    """Stop the herder's process group; leave it stopped if it holds results it has not settled.

    Stopped, it settles nothing more, and a read it was blocked in still
    takes the next results the workers publish: after a moment it holds
    some, so the kill that follows is sure to take them with it. Returns
    their generation task ids (none: it was let go again).
    """
    os.killpg(herder.proc.pid, signal.SIGSTOP)
    held = poll(lambda: held_results(r, herder), 3.0)
    if held:
        return set(held)
    os.killpg(herder.proc.pid, signal.SIGCONT)
    return set()


def stored_results(r: redis_lib.Redis, job_ids: set[str]) -> dict[str, list[tuple[int, str]]]:
    """(attempt, generation task id) of every successful generation result stored for these jobs."""
    found: dict[str, list[tuple[int, str]]] = defaultdict(list)
    for key in r.scan_iter(match="celery-task-meta-*", count=1000):
        raw = r.get(key)
        meta = json.loads(raw) if raw else None
        result = meta.get("result") if isinstance(meta, dict) else None
        if meta and meta.get("status") == "SUCCESS" and isinstance(result, dict) and result.get("job_id") in job_ids:
            found[result["job_id"]].append((int(result["attempt"]), str(meta["task_id"])))
    return found


def unacked_tasks(r: redis_lib.Redis) -> dict[str, int]:
    """How many messages of each task sit delivered but unacknowledged in Redis."""
    names = [json.loads(raw)[0]["headers"].get("task") for raw in r.hvals("unacked")]
    return {name: names.count(name) for name in sorted(set(names))}


def redeliver_unacked(r: redis_lib.Redis) -> list[str]:
    """Put every unacknowledged message back on its queue, as Redis does once the visibility timeout passed.

    Returns the task ids of the messages.
    """
    raws = r.hgetall("unacked")
    with requester_app().connection_for_write() as connection:
        for tag in raws:
            connection.default_channel.qos.restore_by_tag(tag if isinstance(tag, str) else tag.decode())
    return [json.loads(raw)[0]["headers"]["id"] for raw in raws.values()]


@pytest.mark.slow  # real herder processes, one of them killed
def test_a_herder_killed_mid_burst_loses_nothing_and_charges_nothing_twice(
        fleet: tuple[Fleet, sessionmaker[Session]], tmp_path: Path) -> None:
    f, sessions = fleet
    with sessions.begin() as s:
        _, api_key = ledger.create_account(s, "burst", 10**9)
    window = audit_window(sessions, f.r, tmp_path, "two herders, one SIGKILLed mid-burst")
    arrived = threading.Semaphore(0)
    stop = threading.Event()

    def request(i: int) -> Outcome:
        herder, reference = Herder(api_key, timeout_s=RPC_TIMEOUT_S), f"burst-{i}"
        started, submits = time.monotonic(), 0
        while not stop.is_set():
            submits += 1
            try:
                handle = herder.run(messages=[{"role": "user", "content": f"Say {i}."}], tokens=8,
                                    reference=reference)
                response = handle.response(timeout=RESULT_TIMEOUT_S)
            except CallTimeout:
                continue  # the herder that took our call died with it: the same reference names the same job
            arrived.release()
            return Outcome(reference, handle.id, response, submits, time.monotonic() - started)
        raise RuntimeError(f"{reference}: the test gave up")

    victim = f.herders[0]
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        futures = [pool.submit(request, i) for i in range(REQUESTS)]
        try:
            for _ in range(KILL_AFTER):
                assert arrived.acquire(timeout=60), "results stopped arriving before the kill"
            held = wait_for(lambda: frozen_holding_results(f.r, victim), 30,
                            "the first herder to hold results it has not settled", victim.output, every_s=0.01)
            f.kill(victim)
            pending = sum(not fut.done() for fut in futures)
            outcomes = [fut.result(timeout=RESULT_TIMEOUT_S * 2) for fut in futures]
        finally:
            stop.set()
    assert pending > 0, "the burst had ended before the kill: nothing was in flight"

    # Every requester got its one result, from the one job its reference names.
    with sessions.begin() as s:
        jobs = {row.reference: (row.id, row.state, row.attempt) for row in s.scalars(select(JobRow))}
    assert len(jobs) == REQUESTS, f"{len(jobs)} jobs for {REQUESTS} references"
    for o in outcomes:
        assert o.response["status"] == DONE, (o.reference, o.response.get("error"), o.response.get("message"))
        assert o.response["job_id"] == o.job_id == jobs[o.reference][0], o.reference

    # Every job ended exactly once, none was charged twice, the books balance (the chaos suite's audit).
    window.sent(sum(o.submits for o in outcomes))
    row, problems = window.finish()
    assert (row.lost, row.double_charged, row.double_delivered) == (0, 0, 0), problems
    assert not problems, "\n".join(problems)

    # A generation that finished is settled from its stored result even when the herder that had read it
    # died (the tick reconciles it), not generated a second time once its lease runs out.
    attempts = {job_id: attempt for job_id, _, attempt in jobs.values()}
    stored = stored_results(f.r, set(attempts))
    wasted = {job_id: sorted(found) for job_id, found in stored.items()
              if any(attempt < attempts[job_id] for attempt, _ in found)}
    lost_settles = {job_id for job_id, found in stored.items() for _, task in found if task in held}
    print(f"killed {victim.name} with {pending} of {REQUESTS} requests unanswered; {len(lost_settles)} "
          f"result(s) it had read died with it (their jobs' attempts: {sorted(attempts[j] for j in lost_settles)}); "
          f"{sum(a > 1 for a in attempts.values())} job(s) ran more than once; "
          f"{sum(o.submits > 1 for o in outcomes)} requester(s) submitted again; "
          f"slowest request {max(o.latency_s for o in outcomes):.1f}s; left unacknowledged in Redis: "
          f"{unacked_tasks(f.r)}")
    assert lost_settles, f"no result died with {victim.name}: the kill proved nothing about them"
    assert not wasted, (
        f"{len(wasted)} job(s) were generated again although an earlier attempt's result was stored: {wasted}; "
        f"{len(wasted.keys() & lost_settles)} of them had their result read by the killed herder")

    # An hour later Redis hands the dead herder's messages to the survivor: nothing may change.
    redelivered = redeliver_unacked(f.r)
    survivor = f.herders[1]
    # Handled: run, or discarded because it expired with its caller's wait (the client's calls carry expiry).
    wait_for(lambda: all(re.search(rf"\[{task_id}\] (succeeded|failed|raised)|revoked task: \S+\[{task_id}\]",
                                   survivor.output())
                         for task_id in redelivered),
             30, f"the surviving herder to handle the redelivered {redelivered}", survivor.output)
    again_window = audit_window(sessions, f.r, tmp_path, "the dead herder's messages redelivered")
    with sessions.begin() as s:
        after = {row.id: row.attempt for row in s.scalars(select(JobRow))}
    assert after == attempts, "a redelivered message changed the jobs"
    row, problems = again_window.finish()
    assert not problems, "\n".join(problems)
