"""A worker changing models on an Init, with the process around it faked (the real one: tests/router/test_worker_init.py)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llama_tasks import control, registry
from llama_tasks.control import DRAINING, IDLE, LOADED, LOADING, REFUSED, SERVING
from llama_tasks.registry import ModelSpec
from llama_tasks.settings import WorkerSettings
from llama_tasks.switching import HANDED_BACK, Switcher

HERDER = Ed25519PrivateKey.generate()


class FakeHost:
    """Records what a switch does to the process; ``jobs`` is what still runs at each look."""

    def __init__(self, jobs: list[int] | None = None, fail_load: set[str] | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.jobs = list(jobs or [])
        self.fail_load = fail_load or set()
        self.states: list[str] = []
        self.switcher: Switcher | None = None
        self.running_at_unload = 0

    def consume(self, queue: str) -> None:
        self.calls.append(("consume", queue))

    def stop_consuming(self, queue: str) -> None:
        self.calls.append(("stop_consuming", queue))

    def running(self) -> int:
        # Each look, one fewer job runs: a drain that finishes, without sleeping in the test.
        return self.jobs.pop(0) if self.jobs else 0

    def load(self, spec: ModelSpec) -> None:
        self.calls.append(("load", spec.name))
        if spec.name in self.fail_load:
            raise RuntimeError("llama.cpp could not load it")

    def unload(self, reason: str) -> None:
        self.calls.append(("unload", reason))
        self.running_at_unload = len(self.jobs)

    def beat(self) -> None:
        if self.switcher is not None:
            self.states.append(self.switcher.state)


@pytest.fixture
def settings(tmp_path: Path) -> WorkerSettings:
    # The bundled file under a second name: two models for the mechanics.
    registry.add_model(tmp_path / "models.json", "second", registry.smollm2_path())
    return WorkerSettings(home=tmp_path)


def _switcher(settings: WorkerSettings, r: Any, host: FakeHost, serving: str | None) -> Switcher:
    switcher = Switcher(settings, host, r, HERDER.public_key(), f"w@{time.monotonic_ns()}", started_at=0.0)
    host.switcher = switcher
    switcher.serving(registry.lookup(settings.models_file, serving) if serving else None)
    return switcher


def _init(switcher: Switcher, model: str, model_id: str | None = None, grace_s: float = 5.0) -> dict[str, Any]:
    spec = registry.load_registry(switcher.settings.models_file).get(model)
    envelope = control.build(switcher.worker, model, model_id or (spec.model_id if spec else "0" * 64), HERDER,
                             time.time(), grace_s=grace_s)
    switcher.handle(envelope)
    assert switcher.last is not None
    assert switcher.last["nonce"] == envelope["payload"]["nonce"]
    return switcher.last


def test_an_idle_worker_loads_the_model_once_and_takes_its_queue(settings: WorkerSettings, r: Any) -> None:
    host = FakeHost()
    switcher = _switcher(settings, r, host, None)
    assert switcher.describe()["state"] == IDLE and switcher.describe()["model"] is None
    outcome = _init(switcher, "second")
    assert outcome["outcome"] == LOADED
    assert host.calls == [("unload", HANDED_BACK), ("load", "second"), ("consume", "llama.second")]
    doc = switcher.describe()
    assert (doc["state"], doc["model"], doc["queue"]) == (SERVING, "second", "llama.second")
    assert doc["model_id"] == registry.SMOLLM2_SHA256
    assert {m["model"] for m in doc["can_load"]} >= {"smollm2", "second"}
    # Each step was in a heartbeat as it happened.
    assert host.states == [IDLE, LOADING, SERVING, SERVING]


def test_a_serving_worker_drains_its_jobs_before_it_changes(settings: WorkerSettings, r: Any) -> None:
    host = FakeHost(jobs=[2, 1, 0])
    switcher = _switcher(settings, r, host, "smollm2")
    assert _init(switcher, "second")["outcome"] == LOADED
    assert host.calls[0] == ("stop_consuming", "llama.smollm2")
    assert host.calls[1:] == [("unload", HANDED_BACK), ("load", "second"), ("consume", "llama.second")]
    assert host.jobs == []  # it waited for every running job to finish
    assert DRAINING in host.states and host.states.index(DRAINING) < host.states.index(LOADING)


def test_jobs_still_running_past_the_grace_period_are_handed_back(settings: WorkerSettings, r: Any) -> None:
    host = FakeHost(jobs=[1, 1, 1])
    switcher = _switcher(settings, r, host, "smollm2")
    assert _init(switcher, "second", grace_s=0.0)["outcome"] == LOADED
    # Unloading stops the engine while a job still runs: it fails retryably, to run again elsewhere.
    assert ("unload", HANDED_BACK) in host.calls and host.running_at_unload > 0
    assert host.calls[-2:] == [("load", "second"), ("consume", "llama.second")]


@pytest.mark.parametrize("model, model_id, memory_mb, reason", [
    ("nonesuch", None, 0, "not in the registry|nonesuch"),
    ("second", "f" * 64, 0, "is b179c952"),
    ("second", None, 1, "needs .* MB, this worker can hold 1 MB"),
])
def test_an_init_the_worker_cannot_load_is_refused_and_it_keeps_serving(
        settings: WorkerSettings, r: Any, model: str, model_id: str | None, memory_mb: int, reason: str) -> None:
    import re

    if memory_mb:
        settings = settings.model_copy(update={"memory_mb": memory_mb})
    host = FakeHost()
    switcher = _switcher(settings, r, host, "smollm2")
    outcome = _init(switcher, model, model_id)
    assert outcome["outcome"] == REFUSED and re.search(reason, outcome["reason"]), outcome
    assert host.calls == []  # nothing drained, unloaded or loaded
    assert (switcher.state, switcher.describe()["model"]) == (SERVING, "smollm2")


def test_a_file_that_changed_since_it_was_registered_is_refused(settings: WorkerSettings, r: Any, tmp_path: Path) -> None:
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(registry.smollm2_path().read_bytes())
    registry.add_model(settings.models_file, "copied", copy)
    with open(copy, "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\0" if f.read(1) != b"\0" else b"\1")
    host = FakeHost()
    switcher = _switcher(settings, r, host, "smollm2")
    outcome = _init(switcher, "copied")
    assert outcome["outcome"] == REFUSED and "sha256" in outcome["reason"]
    assert host.calls == []


def test_a_load_that_fails_loads_the_old_model_again(settings: WorkerSettings, r: Any) -> None:
    host = FakeHost(fail_load={"second"})
    switcher = _switcher(settings, r, host, "smollm2")
    outcome = _init(switcher, "second")
    assert outcome["outcome"] == REFUSED and "llama.cpp could not load it" in outcome["reason"]
    assert host.calls[-2:] == [("load", "smollm2"), ("consume", "llama.smollm2")]
    assert (switcher.state, switcher.describe()["model"]) == (SERVING, "smollm2")


def test_an_init_for_the_model_it_serves_changes_nothing(settings: WorkerSettings, r: Any) -> None:
    host = FakeHost()
    switcher = _switcher(settings, r, host, "smollm2")
    outcome = _init(switcher, "smollm2")
    assert outcome["outcome"] == LOADED and outcome["reason"] == "already serving it"
    assert host.calls == []


def test_a_forged_init_changes_nothing_and_reports_nothing(settings: WorkerSettings, r: Any) -> None:
    host = FakeHost()
    switcher = _switcher(settings, r, host, "smollm2")
    forged = control.build(switcher.worker, "second", registry.SMOLLM2_SHA256, Ed25519PrivateKey.generate(), time.time())
    switcher.handle(forged)
    assert host.calls == [] and switcher.last is None and switcher.state == SERVING


def test_a_replayed_init_is_refused_and_says_so(settings: WorkerSettings, r: Any) -> None:
    host = FakeHost()
    switcher = _switcher(settings, r, host, None)
    envelope = control.build(switcher.worker, "second", registry.SMOLLM2_SHA256, HERDER, time.time())
    switcher.handle(envelope)
    assert switcher.last is not None and switcher.last["outcome"] == LOADED
    loads = len(host.calls)
    switcher.handle(envelope)
    assert switcher.last["outcome"] == REFUSED and "already received" in switcher.last["reason"]
    assert len(host.calls) == loads

