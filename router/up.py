"""``llamas up``: the whole service on one machine, on embedded defaults.

Brings up Redis (the configured one, or an embedded Valkey when the default
address has none), the signing keys, the ledger with a demo account, one
inference worker for the configured model and the herder with its beat;
then pays for one demo request, prints the answer as it streams with what it
cost and what was refunded, and stays up until Ctrl-C.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from llama_tasks import redis_server, registry, signing
from llama_tasks.constants import HERD_PREFIX
from llama_tasks.settings import queue_for
from router.settings import HERDER_QUEUE, HerderSettings
from router.supervisor import Component, Supervisor, python_module

console = Console()

DEMO_ACCOUNT = "demo"
DEMO_CREDITS = 1_000_000
DEMO_MESSAGES = [{"role": "user", "content": "Say hello to a herd of llamas in one short sentence."}]
#: How long `up` waits for a component to become ready.
READY_TIMEOUT_S = 120.0


def _wait(what: str, component: Component, ready: Any) -> Any:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        value = ready()
        if value:
            return value
        if not component.running:
            raise SystemExit(f"{what} failed to start (log {component.log}):\n{component.tail()}")
        time.sleep(0.2)
    raise SystemExit(f"{what} was not ready in {READY_TIMEOUT_S:.0f}s (log {component.log}):\n{component.tail()}")


def demo_key(settings: HerderSettings) -> str:
    """The demo account's API key: created (and printed) on the first run only."""
    from router import ledger
    from router.db import make_engine, make_sessionmaker, upgrade

    key_file = settings.home / "demo.key"
    if key_file.exists():
        return key_file.read_text().strip()
    upgrade(settings.ledger_url)
    engine = make_engine(settings.ledger_url)
    with make_sessionmaker(engine).begin() as session:
        _, key = ledger.create_account(session, DEMO_ACCOUNT, DEMO_CREDITS)
    engine.dispose()
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    console.print(f"[bold]account[/] created '{DEMO_ACCOUNT}' with {DEMO_CREDITS:,} credits; its API key "
                  f"(shown once, kept for the demo in {key_file}):\n        [bold yellow]{key}[/]")
    return key


def _demo(api_key: str) -> None:
    """Pay for one request through the herder and print it as it streams."""
    from router.client import Herder

    herder = Herder(api_key)
    handle = herder.run(messages=DEMO_MESSAGES, tokens=48, multiplier=1)
    console.print(f"[bold]demo[/]    job {handle.id}: {DEMO_MESSAGES[0]['content']}")
    console.print(f"        quote {handle.doc['quote']}, held {handle.doc['offered']}")
    console.print("[green]answer:[/] ", end="")
    for piece in handle.stream(timeout=120):
        console.print(piece, end="", markup=False, highlight=False)
    console.print()
    doc = handle.result(timeout=120)
    t = doc["timings"]
    console.print(
        f"        {doc['prompt_tokens']} prompt + {doc['completion_tokens']} completion tokens, "
        f"finish={doc['finish_reason']}, {t.get('tokens_per_s', 0):.0f} tokens/s on {doc['worker']}\n"
        f"        [bold]charged {doc['charged']}[/], refunded {doc['refunded']} of {doc['offered']} held"
    )


def up(concurrency: int | None = None) -> None:
    """Run the service in the foreground until interrupted."""
    import redis

    settings = HerderSettings()
    settings.home.mkdir(parents=True, exist_ok=True)
    embedded = redis_server.ensure(settings.redis_url)
    where = "embedded Valkey (nothing answered there)" if embedded else "existing server"
    console.print(f"[bold]redis[/]   {settings.redis_url} — {where}")
    if not settings.private_key_file.exists():
        signing.generate_keypair(settings.home)
        console.print(f"[bold]keys[/]    created the herder's signing key pair in {settings.home}")
    spec = registry.lookup(settings.models_file, settings.model)
    registry.verify(spec)
    console.print(f"[bold]model[/]   {spec.name} id {spec.model_id[:16]}…")
    console.print(f"[bold]ledger[/]  {settings.ledger_url}")
    api_key = demo_key(settings)

    env = dict(os.environ, LLAMAS_HOME=str(settings.home), LLAMAS_REDIS_URL=settings.redis_url)
    logs = settings.home / "logs"
    node = os.uname().nodename
    supervisor = Supervisor(report=lambda text: console.print(f"[red]{text}[/]"))
    r = redis.Redis.from_url(settings.redis_url)
    try:
        worker_name = f"llama-{spec.name}@{node}"
        worker = supervisor.add(Component(
            name=f"worker {spec.name}",
            argv=python_module(
                "celery", "-A", "llama_tasks", "worker", "-Q", queue_for(spec.name), "-n", worker_name,
                "-c", str(concurrency or settings.concurrency), "-l", "info",
                "--without-mingle", "--without-gossip",
            ),
            env=env, log=logs / f"worker-{spec.name}.log",
        ))
        herder = supervisor.add(Component(
            name="herder",
            argv=python_module(
                "celery", "-A", "router", "worker", "-Q", HERDER_QUEUE, "-B", "-n", f"herder@{node}",
                "-c", "2", "-l", "info", "--without-mingle", "--without-gossip",
            ),
            env=env, log=logs / "herder.log",
        ))
        beat = _wait(f"worker {spec.name}", worker, lambda: r.get(HERD_PREFIX + worker_name))
        console.print(f"[bold]worker[/]  {worker_name}: {json.loads(beat)['slots']} slot(s), log {worker.log}")
        _wait("herder", herder, lambda: "ready." in _read(herder.log))
        console.print(f"[bold]herder[/]  herder@{node} on queue '{HERDER_QUEUE}' with beat, log {herder.log}")
        _demo(api_key)
        console.print("[bold]up[/] — Ctrl-C stops everything.")
        supervisor.run_forever()
    finally:
        supervisor.stop_all()
        if embedded is not None:
            embedded.stop()
        console.print("stopped.")


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
