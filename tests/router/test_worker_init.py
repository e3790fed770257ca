"""Init on the real stack: a running worker told to serve another model (real herder, real SmolLM2 workers).

Two models for the mechanics: the bundled SmolLM2 file registered a second
time as ``second`` in the stack's own home. Every test ends with the books
audited and each job charged once.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llama_tasks import control, registry, signing
from llama_tasks.constants import HERD_PREFIX, STREAM_PREFIX
from llama_tasks.control import DRAINING, IDLE, REFUSED, SERVING
from router.admin import HerdAdmin
from router.core.errors import InitRefused, JobNotQueued, UnknownModelId
from router.core.settings import HerderSettings
from tests.processes import ROOT, CeleryProcess, wait_for
from tests.stack import BLOCKER, Stack, running_stack

pytestmark = pytest.mark.slow

SECOND = "second"


def _prepare(db_url: str, tmp: Path) -> dict[str, str]:
    """A home of the stack's own: the session's keys and a registry with the second model."""
    home = tmp / "home"
    home.mkdir()
    for name in ("herder.key", "herder.pub", "house.key", "house.pub"):
        shutil.copy(Path(os.environ["LLAMAS_HOME"]) / name, home / name)
    registry.add_model(home / "models.json", SECOND, registry.smollm2_path())
    return {"LLAMAS_HOME": str(home)}


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, redis_url: str) -> Iterator[Stack]:
    yield from running_stack(request.param, tmp_path_factory, prepare=_prepare)


@pytest.fixture
def admin(stack: Stack) -> HerdAdmin:
    env = stack.env
    return HerdAdmin(HerderSettings(home=Path(env["LLAMAS_HOME"]), database_url=stack.db_url,
                                    redis_url=env["LLAMAS_REDIS_URL"]))


@pytest.fixture
def workers(stack: Stack, tmp_path: Path) -> Iterator[Callable[..., CeleryProcess]]:
    """Start extra inference workers (with a model, or ``None``: ``--no-model``); stopped when the test ends."""
    started: list[CeleryProcess] = []

    def start(model: str | None) -> CeleryProcess:
        name = f"init-{uuid.uuid4().hex[:6]}"
        env = dict(stack.env, LLAMAS_MODEL=model or registry.DEFAULT_MODEL)
        extra = [] if model else ["--no-model"]
        # -Q names the default model's queue: a --no-model worker must consume none of it.
        worker = CeleryProcess("llama_tasks", f"llama.{model or registry.DEFAULT_MODEL}", name, 1, env,
                               tmp_path / f"{name}.log", extra)
        started.append(worker)
        worker.wait_ready(stack.r)
        return worker

    yield start
    for worker in started:
        worker.stop()


def _beat(stack: Stack, worker: CeleryProcess) -> dict[str, Any] | None:
    raw = stack.r.get(HERD_PREFIX + worker.worker)
    return json.loads(raw) if raw else None


def _serving(stack: Stack, worker: CeleryProcess, model: str) -> dict[str, Any]:
    return wait_for(lambda: (b := _beat(stack, worker)) and b["state"] == SERVING and b["model"] == model and b,
                    30, f"{worker.worker} serving {model}", worker.output)


def _load_count(stack: Stack, job_id: str) -> int:
    """The load count in the worker's own result document of the job's last attempt (Celery's result store)."""
    stored = json.loads(stack.r.get("celery-task-meta-" + str(stack.job(job_id).task_id)))
    return int(stored["result"]["load_count"])


def _first_token(stack: Stack, job_id: str, attempt: int = 1) -> None:
    """Return once ``attempt`` of the job has streamed a token (it holds a slot)."""
    def streamed() -> bool:
        entries = stack.r.xrange(STREAM_PREFIX + job_id)
        return any(f.get(b"event") == b"token" and f.get(b"attempt") == str(attempt).encode() for _, f in entries)

    wait_for(streamed, 90, f"a token of attempt {attempt}")


def _release(handle: Any) -> dict[str, Any]:
    try:
        handle.cancel()
    except JobNotQueued:
        pass
    return handle.result(timeout=120)


def test_a_worker_started_with_no_model_is_initialised_from_the_cli_and_answers(stack, workers):
    worker = workers(None)
    beat = _beat(stack, worker)
    assert beat is not None and (beat["state"], beat["model"], beat["queue"]) == (IDLE, None, None)
    assert {m["model"] for m in beat["can_load"]} >= {registry.DEFAULT_MODEL, SECOND}
    cli = subprocess.run([sys.executable, "-m", "router.cli", "workers", "init", worker.worker, SECOND],
                         cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert f"{worker.worker} serves {SECOND}" in cli.stdout
    listed = subprocess.run([sys.executable, "-m", "router.cli", "workers", "list", "--json"],
                            cwd=ROOT, env=stack.env, capture_output=True, text=True, timeout=60)
    line = next(w for w in json.loads(listed.stdout) if w["worker"] == worker.worker)
    assert (line["model"], line["state"]) == (SECOND, SERVING) and line["since"] is not None

    key, herder = stack.account(100_000)
    doc = herder.run("Say hi.", 8, model=SECOND, temperature=0.0).result(timeout=120)
    assert doc["status"] == "done" and doc["worker"] == worker.worker
    assert _load_count(stack, doc["job_id"]) == 1  # loaded once, at the Init
    assert stack.captures(doc["job_id"]) == 1
    assert stack.books() == []


def test_jobs_running_at_an_init_finish_where_they_are_then_the_worker_serves_the_new_model(stack, workers, admin):
    worker = workers(SECOND)
    key, herder = stack.account(100_000)
    handle = herder.run(model=SECOND, **dict(BLOCKER, tokens=40, grammar="root ::= [a-z]{40}"))
    _first_token(stack, handle.id)
    moved = admin.init(worker.worker, registry.DEFAULT_MODEL, grace_s=120)
    assert moved["model"] == registry.DEFAULT_MODEL
    doc = handle.result(timeout=120)
    # It finished on the worker that had it, in its first attempt, before the worker moved.
    assert doc["status"] == "done" and doc["worker"] == worker.worker and stack.job(handle.id).attempt == 1
    assert stack.captures(handle.id) == 1
    beat = _serving(stack, worker, registry.DEFAULT_MODEL)
    assert beat["init"]["outcome"] == "loaded"
    # Its second model, loaded once: the worker's next answer counts two loads in its life.
    stack.worker.stop()  # the stack's own smollm2 worker steps aside, so this one answers
    try:
        doc = herder.run("Say hi.", 8, temperature=0.0).result(timeout=120)
        assert doc["worker"] == worker.worker and _load_count(stack, doc["job_id"]) == 2
    finally:
        stack.replace_worker()
    assert stack.books() == []


def test_a_job_past_the_grace_period_is_handed_back_and_runs_elsewhere_charged_once(stack, workers, admin):
    worker = workers(SECOND)
    key, herder = stack.account(1_000_000)
    before = stack.balance(key)
    handle = herder.run(model=SECOND, **BLOCKER)
    _first_token(stack, handle.id)
    admin.init(worker.worker, registry.DEFAULT_MODEL, grace_s=0)
    # Handed back: queued again for another attempt, nothing charged, its money still held.
    # (Its worker was seen draining before the hand-back: no herder sent it back to a queue nobody takes.)
    wait_for(lambda: stack.job(handle.id).state == "queued", 60, "the job queued again", worker.output)
    assert stack.job(handle.id).attempt == 1
    assert stack.captures(handle.id) == 0
    other = workers(SECOND)
    _first_token(stack, handle.id, attempt=2)
    doc = _release(handle)
    assert doc["worker"] == other.worker and stack.job(handle.id).attempt == 2
    assert stack.captures(handle.id) == 1
    assert stack.balance(key) == before - doc["charged"]
    assert stack.books() == []


def test_an_init_the_worker_cannot_load_is_refused_with_its_reason_and_it_keeps_serving(stack, workers, admin, tmp_path):
    worker = workers(SECOND)
    home = Path(stack.env["LLAMAS_HOME"])
    # Registered, then its file gone (a host that lacks it).
    copy = tmp_path / "gone.gguf"
    shutil.copy(registry.smollm2_path(), copy)
    registry.add_model(home / "models.json", "gone", copy)
    copy.unlink()
    with pytest.raises(InitRefused, match="gone"):
        admin.init(worker.worker, "gone", timeout_s=60)
    with pytest.raises(UnknownModelId):
        admin.init(worker.worker, "nonesuch", timeout_s=60)
    beat = _beat(stack, worker)
    assert beat is not None and (beat["state"], beat["model"]) == (SERVING, SECOND)
    assert beat["init"]["outcome"] == REFUSED
    key, herder = stack.account(100_000)
    doc = herder.run("Say hi.", 8, model=SECOND, temperature=0.0).result(timeout=120)
    assert doc["worker"] == worker.worker and _load_count(stack, doc["job_id"]) == 1
    assert stack.books() == []


def test_a_forged_or_replayed_init_moves_nothing(stack, workers, admin):
    worker = workers(SECOND)
    # One real Init (to what it serves), then a copy of it and a forgery pushed on its list.
    sent = admin.init(worker.worker, SECOND, wait=False)
    wait_for(lambda: ((_beat(stack, worker) or {}).get("init") or {}).get("nonce") == sent["nonce"], 30,
             "the first Init's outcome")
    key = Ed25519PrivateKey.generate()
    forged = control.build(worker.worker, registry.DEFAULT_MODEL, registry.SMOLLM2_SHA256, key, time.time())
    control.send(stack.r, forged)
    replay = control.build(worker.worker, registry.DEFAULT_MODEL, registry.SMOLLM2_SHA256,
                           signing.load_private(Path(stack.env["LLAMAS_HOME"]) / "herder.key"), time.time())
    control.send(stack.r, replay)
    wait_for(lambda: ((_beat(stack, worker) or {}).get("init") or {}).get("nonce") == replay["payload"]["nonce"], 30,
             "the genuine Init's outcome")
    _serving(stack, worker, registry.DEFAULT_MODEL)
    control.send(stack.r, replay)  # the very same message again
    wait_for(lambda: ((_beat(stack, worker) or {}).get("init") or {}).get("outcome") == REFUSED, 30,
             "the replay refused", worker.output)
    beat = _beat(stack, worker)
    assert beat is not None and "already received" in beat["init"]["reason"]
    assert (beat["state"], beat["model"]) == (SERVING, registry.DEFAULT_MODEL)
    assert "control message refused" in worker.output()  # the forgery, logged and ignored


def test_a_worker_killed_mid_init_loses_nothing_and_leaves_the_herd(stack, workers, admin):
    worker = workers(SECOND)
    key, herder = stack.account(1_000_000)
    before = stack.balance(key)
    handle = herder.run(model=SECOND, **BLOCKER)
    _first_token(stack, handle.id)
    admin.init(worker.worker, registry.DEFAULT_MODEL, grace_s=600, wait=False)
    wait_for(lambda: (_beat(stack, worker) or {}).get("state") == DRAINING, 30, "draining", worker.output)
    os.killpg(worker.proc.pid, signal.SIGKILL)
    worker.proc.wait(timeout=10)
    # Its heartbeat runs out: no herder thinks it serves anything.
    wait_for(lambda: all(w.worker != worker.worker for w in admin.workers()), 30, "the dead worker gone from the herd")
    wait_for(lambda: stack.job(handle.id).state == "queued", 90, "the lost attempt queued again")
    other = workers(SECOND)
    _first_token(stack, handle.id, attempt=2)
    doc = _release(handle)
    assert doc["worker"] == other.worker
    assert stack.captures(handle.id) == 1
    assert stack.balance(key) == before - doc["charged"]
    assert stack.books() == []
