"""``llamas up``: the whole service on one machine, on embedded defaults.

Brings up Redis (the configured one, or an embedded Valkey when the default
address has none), the signing keys, and one inference worker per configured
model; then sends one signed demo job, prints the answer as it streams, and
stays up until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from typing import Any

from rich.console import Console

from llama_tasks import redis_server, registry, signing, stream
from llama_tasks.constants import HERD_PREFIX
from llama_tasks.job import Job
from llama_tasks.settings import WorkerSettings, queue_for
from router.supervisor import Component, Supervisor, python_module

console = Console()

DEMO_MESSAGES = [{"role": "user", "content": "Say hello to a herd of llamas in one short sentence."}]
#: How long `up` waits for a worker's first heartbeat before giving up.
READY_TIMEOUT_S = 120.0


def _wait_for_heartbeat(r: Any, worker: Component, hostname: str) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        doc = r.get(HERD_PREFIX + hostname)
        if doc:
            return json.loads(doc)
        if not worker.running:
            raise SystemExit(f"{worker.name} failed to start:\n{worker.tail()}")
        time.sleep(0.2)
    raise SystemExit(f"{worker.name} sent no heartbeat in {READY_TIMEOUT_S:.0f}s:\n{worker.tail()}")


def _demo(settings: WorkerSettings, r: Any) -> None:
    """Send one job signed with the herder's key and print it as it streams."""
    from llama_tasks import app  # imported late: it reads the settings once

    key = signing.load_private(settings.private_key_file)
    now = time.time()
    job = Job(
        job_id=uuid.uuid4().hex, attempt=1, model=settings.model, max_tokens=48,
        expires_at=now + 300, issued_at=now, messages=DEMO_MESSAGES,
    )
    console.print(f"[bold]demo job[/] {job.job_id}: {DEMO_MESSAGES[0]['content']}")
    result = app.send_task("llama_tasks.generate", args=[signing.sign(job.to_payload(), key)],
                           queue=queue_for(settings.model))
    console.print("[green]answer:[/] ", end="")
    for event in stream.follow(r, job.job_id, timeout_s=120):
        if event["event"] == "token":
            console.print(event["text"], end="", markup=False, highlight=False)
    console.print()
    doc = result.get(timeout=120)
    t = doc["timings"]
    console.print(
        f"  {doc['prompt_tokens']} prompt + {doc['completion_tokens']} completion tokens, "
        f"finish={doc['finish_reason']}, {t['tokens_per_s']:.0f} tokens/s, "
        f"worker {doc['worker']} pid {doc['pid']} (model loads in that process: {doc['load_count']})"
    )


def up(concurrency: int | None = None) -> None:
    """Run the service in the foreground until interrupted."""
    import redis

    settings = WorkerSettings()
    settings.home.mkdir(parents=True, exist_ok=True)
    embedded = redis_server.ensure(settings.redis_url)
    where = "embedded Valkey (nothing answered there)" if embedded else "existing server"
    console.print(f"[bold]redis[/]   {settings.redis_url} — {where}")
    if not settings.private_key_file.exists():
        signing.generate_keypair(settings.home)
        console.print(f"[bold]keys[/]    created the herder's signing key pair in {settings.home}")
    spec = registry.lookup(settings.models_file, settings.model)
    console.print(f"[bold]model[/]   {spec.name} id {spec.model_id[:16]}… ({spec.path})")

    env = dict(os.environ, LLAMAS_HOME=str(settings.home), LLAMAS_REDIS_URL=settings.redis_url)
    logs = settings.home / "logs"
    supervisor = Supervisor(report=lambda text: console.print(f"[red]{text}[/]"))
    hostname = f"llama-{spec.name}@{os.uname().nodename}"
    try:
        worker = supervisor.add(Component(
            name=f"worker {spec.name}",
            argv=python_module(
                "celery", "-A", "llama_tasks", "worker", "-Q", queue_for(spec.name),
                "-n", hostname, "-c", str(concurrency or settings.concurrency), "-l", "info",
                "--without-mingle", "--without-gossip",
            ),
            env=env, log=logs / f"worker-{spec.name}.log",
        ))
        r = redis.Redis.from_url(settings.redis_url)
        beat = _wait_for_heartbeat(r, worker, hostname)
        console.print(f"[bold]worker[/]  {hostname}: {beat['slots']} slot(s), log {worker.log}")
        _demo(settings, r)
        console.print("[bold]up[/] — Ctrl-C stops everything.")
        supervisor.run_forever()
    finally:
        supervisor.stop_all()
        if embedded is not None:
            embedded.stop()
        console.print("stopped.")
