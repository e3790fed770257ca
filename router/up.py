"""``llamas up``: the whole service on one machine, on embedded defaults.

Brings up Redis (the configured one, or an embedded Valkey when the default
address has none), the signing keys, the ledger with a demo account, one
inference worker for the configured model, the herder with its beat, the
HTTP gateway and Flower; prints where everything is, pays for one demo
request through the gateway, prints the answer as it streams with what it
cost and what was refunded, and stays up until Ctrl-C. A component that dies
is reported and restarted.
"""

from __future__ import annotations

import json
import os
import socket
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


def _demo(gateway: str, api_key: str, model: str) -> None:
    """Pay for one request through the gateway, printing it as it streams."""
    import httpx

    body = {"model": model, "messages": DEMO_MESSAGES, "max_tokens": 48, "stream": True,
            "stream_options": {"include_usage": True}}
    console.print(f"[bold]demo[/]    POST {gateway}/v1/chat/completions: {DEMO_MESSAGES[0]['content']}")
    console.print("[green]answer:[/] ", end="")
    usage: dict[str, Any] = {}
    with httpx.stream("POST", f"{gateway}/v1/chat/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {api_key}"}) as reply:
        if reply.status_code != 200:
            raise SystemExit(f"the demo request failed: HTTP {reply.status_code}: {reply.read().decode()}")
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            for choice in chunk.get("choices", []):
                console.print(choice["delta"].get("content") or "", end="", markup=False, highlight=False)
            usage = chunk.get("usage") or usage
    console.print()
    console.print(
        f"        {usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} completion tokens; "
        f"[bold]charged {usage.get('charged')}[/], refunded {usage.get('refunded')} of {usage.get('offered')} held"
    )


def check_port(port: int, what: str, option: str) -> None:
    """Refuse a taken port up front, naming it and the option that changes it."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise SystemExit(
                f"port {port} for the {what} is already taken; choose another with `llamas up {option} N`"
            ) from None


def _where(gateway: str, flower: str, key_file: Path) -> None:
    console.print(f"""
[bold]gateway[/] {gateway}  (OpenAI-compatible; docs {gateway}/docs, metrics {gateway}/metrics)
[bold]flower[/]  {flower}
[bold]try it[/]  export LLAMAS_API_KEY=$(cat {key_file})
  curl {gateway}/v1/chat/completions -H "Authorization: Bearer $LLAMAS_API_KEY" -H 'Content-Type: application/json' -d '{{"model": "smollm2", "messages": [{{"role": "user", "content": "Hi!"}}], "max_tokens": 32}}'
  python -c 'import os, openai; c = openai.OpenAI(base_url="{gateway}/v1", api_key=os.environ["LLAMAS_API_KEY"]); print(c.chat.completions.create(model="smollm2", messages=[{{"role": "user", "content": "Hi!"}}]).choices[0].message.content)'
  llamas run "Hi!" --stream
""", highlight=False, soft_wrap=True)


def up(concurrency: int | None = None, port: int = 8000, flower_port: int = 5555,
       models: list[str] | None = None) -> None:
    """Run the service in the foreground until interrupted; one worker per model."""
    import redis

    settings = HerderSettings()
    check_port(port, "HTTP gateway", "--port")
    check_port(flower_port, "Flower dashboard", "--flower-port")
    settings.home.mkdir(parents=True, exist_ok=True)
    embedded = redis_server.ensure(settings.redis_url)
    where = "embedded Valkey (nothing answered there)" if embedded else "existing server"
    console.print(f"[bold]redis[/]   {settings.redis_url} — {where}")
    if not settings.private_key_file.exists():
        signing.generate_keypair(settings.home)
        console.print(f"[bold]keys[/]    created the herder's signing key pair in {settings.home}")
    specs = [registry.lookup(settings.models_file, name) for name in (models or [settings.model])]
    for spec in specs:
        registry.verify(spec)
        console.print(f"[bold]model[/]   {spec.name} id {spec.model_id[:16]}…")
    console.print(f"[bold]ledger[/]  {settings.ledger_url}")
    api_key = demo_key(settings)

    env = dict(os.environ, LLAMAS_HOME=str(settings.home), LLAMAS_REDIS_URL=settings.redis_url)
    logs = settings.home / "logs"
    node = os.uname().nodename
    supervisor = Supervisor(report=lambda text: console.print(f"[red]{text}[/]"))
    r = redis.Redis.from_url(settings.redis_url)
    gateway, flower = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{flower_port}"
    try:
        workers = {
            f"llama-{spec.name}@{node}": supervisor.add(Component(
                name=f"worker {spec.name}",
                argv=python_module(
                    "celery", "-A", "llama_tasks", "worker", "-Q", queue_for(spec.name),
                    "-n", f"llama-{spec.name}@{node}", "-c", str(concurrency or settings.concurrency),
                    "-l", "info",
                ),
                env=dict(env, LLAMAS_MODEL=spec.name), log=logs / f"worker-{spec.name}.log",
            ))
            for spec in specs
        }
        herder = supervisor.add(Component(
            name="herder",
            argv=python_module(
                "celery", "-A", "router", "worker", "-Q", HERDER_QUEUE, "-B", "-n", f"herder@{node}",
                "-c", "2", "-l", "info",
            ),
            env=env, log=logs / "herder.log",
        ))
        api = supervisor.add(Component(
            name="gateway",
            argv=python_module("uvicorn", "router.api:app", "--host", "127.0.0.1", "--port", str(port)),
            env=env, log=logs / "gateway.log",
        ))
        dashboard = supervisor.add(Component(
            name="flower",
            argv=python_module("celery", "-A", "llama_tasks", "flower", f"--port={flower_port}",
                               "--address=127.0.0.1"),
            # Read-only API for local tools; Flower listens on loopback only.
            env=dict(env, FLOWER_UNAUTHENTICATED_API="true"), log=logs / "flower.log",
        ))
        for worker_name, worker in workers.items():
            beat = _wait(worker.name, worker, lambda: r.get(HERD_PREFIX + worker_name))
            console.print(f"[bold]worker[/]  {worker_name}: {json.loads(beat)['slots']} slot(s), log {worker.log}")
        _wait("herder", herder, lambda: "ready." in _read(herder.log))
        console.print(f"[bold]herder[/]  herder@{node} on queue '{HERDER_QUEUE}' with beat, log {herder.log}")
        _wait("gateway", api, lambda: port_answers(port))
        _wait("flower", dashboard, lambda: port_answers(flower_port))
        _where(gateway, flower, settings.home / "demo.key")
        _demo(gateway, api_key, specs[0].name)
        console.print("[bold]up[/] — Ctrl-C stops everything.")
        supervisor.run_forever()
    finally:
        supervisor.stop_all()
        if embedded is not None:
            embedded.stop()
        console.print("stopped.")


def port_answers(port: int) -> bool:
    """Whether something accepts connections on a loopback port."""
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
