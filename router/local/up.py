"""``llamas up``: the whole service on one machine, on embedded defaults.

Brings up Redis (the configured one, or an embedded Valkey when the default
address has none), the signing keys, the ledger with a demo account, one
inference worker for the configured model, the herder with its beat, the
HTTP gateway and Flower; prints where everything is, pays for one demo
request through the gateway, prints the answer as it streams with what it
cost and what was refunded, and stays up until Ctrl-C. A component that dies
is reported and restarted.

While it runs, ``<home>/up.json`` records the set it started; a second
``llamas up`` for the same home refuses while any of it still runs, and
``llamas down`` stops what a killed one left behind. Flower asks for a
password, and the dashboard (and ``/metrics``) for the admin key, each
made once per home unless ``LLAMAS_ADMIN_KEY`` is set.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import time
from pathlib import Path
from typing import Any

from rich.console import Console

from llama_tasks import redis_server, registry, signing
from llama_tasks.constants import HERD_PREFIX
from llama_tasks.registry import DEFAULT_MODEL
from llama_tasks.settings import get_settings as worker_settings
from llama_tasks.settings import house_key_path, queue_for
from router.core import private_files
from router.core.settings import HERDER_QUEUE, HerderSettings
from router.local.supervisor import RUN_TOKEN_ENV, Component, RunRecord, Supervisor, python_module

console = Console()

DEMO_ACCOUNT = "demo"
DEMO_CREDITS = 1_000_000
DEMO_MESSAGES = [{"role": "user", "content": "Say hello to a herd of llamas in one short sentence."}]
#: How long `up` waits for a component to become ready.
READY_TIMEOUT_S = 120.0
#: uvicorn's ``--http`` for the gateway: ``router.gateway.http_protocol.HTTP_PROTOCOL``, by name
#: (this layer does not import the gateway's; tests/router/test_header_timeout.py checks the two agree).
GATEWAY_HTTP_PROTOCOL = "router.gateway.http_protocol:HeaderTimeoutH11Protocol"
#: Flower's basic-auth user; its password is made once per home.
FLOWER_USER = "admin"
#: Files in the home: the record of a running set, Flower's password and the admin key.
RUN_RECORD, FLOWER_PASSWORD, ADMIN_KEY = "up.json", "flower.password", "admin.key"


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
    from router.core import ledger
    from router.core.db import make_engine, make_sessionmaker, upgrade

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


def flower_password(home: Path) -> tuple[str, bool]:
    """Flower's password for this home, made on first use (mode 0600); True when just made."""
    return home_secret(home / FLOWER_PASSWORD)


def admin_key(home: Path) -> tuple[str, bool]:
    """The admin key for this home's gateway (dashboard, ``/metrics``), made on first use; True when just made."""
    return home_secret(home / ADMIN_KEY)


def home_secret(pw_file: Path) -> tuple[str, bool]:
    """The secret kept in ``pw_file``, made on first use (mode 0600); True when just made."""
    home = pw_file.parent
    try:
        return pw_file.read_text().strip(), False
    except FileNotFoundError:
        pass
    private_files.private_dir(home)
    # URL-safe characters only: Flower splits FLOWER_BASIC_AUTH on ',' and ':'.
    password = secrets.token_urlsafe(18)
    try:
        fd = os.open(pw_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # made meanwhile by another `llamas up` or `make flower`
        return pw_file.read_text().strip(), False
    with os.fdopen(fd, "w") as f:
        f.write(password + "\n")
    return password, True


def _announce_flower_password(password: str, pw_file: Path, out: Console = console) -> None:
    out.print(f"[bold]flower[/]  created a password for Flower's user '{FLOWER_USER}' (shown once, kept in "
              f"{pw_file}):\n        [bold yellow]{password}[/]", highlight=False)


def flower_login() -> str:
    """``user:password`` for Flower's basic auth (``make flower``), telling stderr where the password is kept."""
    home = HerderSettings().home
    password, created = flower_password(home)
    # stderr: the caller captures stdout, which must hold the login alone.
    note = Console(stderr=True)
    if created:
        _announce_flower_password(password, home / FLOWER_PASSWORD, note)
    else:
        note.print(f"[bold]flower[/]  user '{FLOWER_USER}', password in {home / FLOWER_PASSWORD}", highlight=False)
    return f"{FLOWER_USER}:{password}"


def refuse_if_running(home: Path) -> None:
    """Refuse, in one line, while a set recorded for this home still runs; forget a dead one."""
    record = RunRecord.load(home / RUN_RECORD)
    if record is None:
        return
    running = record.survivors()
    if not running:
        return  # every process of it is gone: the record is replaced by ours
    pids = ", ".join(f"{pid} ({name})" for pid, name in sorted(running.items()))
    if record.up_alive():
        raise SystemExit(f"llamas up is already running for {home} (pid {record.pid}; running: {pids}); "
                         "stop it with Ctrl-C where it runs, or with `llamas down`")
    raise SystemExit(f"a previous llamas up for {home} (pid {record.pid}) died and left processes running: "
                     f"{pids}; stop them with `llamas down`")


def down(grace_s: float) -> None:
    """Stop the set recorded for this home (``llamas down``)."""
    home = HerderSettings().home
    record = RunRecord.load(home / RUN_RECORD)
    if record is None:
        console.print(f"nothing to stop: no llamas up is recorded in {home / RUN_RECORD}", highlight=False)
        return
    stopped = record.stop(grace_s)
    if not stopped:
        console.print(f"nothing was running; removed the stale record {record.path}", highlight=False)
        return
    left = record.survivors()
    if left:
        raise SystemExit(f"could not stop {', '.join(map(str, sorted(left)))}: still running after SIGKILL "
                         "(processes of another user?)")
    console.print(f"stopped llamas up (pid {record.pid}): "
                  f"{', '.join(f'{pid} ({name})' for pid, name in sorted(stopped.items()))}", highlight=False)


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


def _where(gateway: str, flower: str, key_file: Path, pw_file: Path, admin: str) -> None:
    console.print(f"""
[bold]gateway[/] {gateway}  (OpenAI-compatible; docs {gateway}/docs, metrics {gateway}/metrics with the admin key)
[bold]dashboard[/] {gateway}/dashboard  (sign in with the admin key, {admin}, or a requester's API key)
[bold]flower[/]  {flower}  (user {FLOWER_USER}, password in {pw_file})
[bold]try it[/]  export LLAMAS_API_KEY=$(cat {key_file})
  curl {gateway}/v1/chat/completions -H "Authorization: Bearer $LLAMAS_API_KEY" -H 'Content-Type: application/json' -d '{{"model": "{DEFAULT_MODEL}", "messages": [{{"role": "user", "content": "Hi!"}}], "max_tokens": 32}}'
  python -c 'import os, openai; c = openai.OpenAI(base_url="{gateway}/v1", api_key=os.environ["LLAMAS_API_KEY"]); print(c.chat.completions.create(model="{DEFAULT_MODEL}", messages=[{{"role": "user", "content": "Hi!"}}]).choices[0].message.content)'
  llamas run "Hi!" --stream
""", highlight=False, soft_wrap=True)  # noqa: E501 (commands to copy, one line each)


def up(slots: int | None = None, port: int = 8000, flower_port: int = 5555,
       models: list[str] | None = None, gpus: list[int] | None = None, placed: int = 0) -> None:
    """Run the service in the foreground until interrupted: one worker per model and GPU.

    ``models`` and ``gpus`` default to the workers' own settings
    (``LLAMAS_MODEL``, ``LLAMAS_GPUS``), which the herder's do not carry.
    ``placed`` > 0 starts that many workers with no model instead, which the
    herder's demand placement gives models (``LLAMAS_PLACEMENT=demand``).
    """
    settings = HerderSettings()
    if placed and settings.placement != "demand":
        raise SystemExit("--workers starts workers with no model, which only demand placement gives models: "
                        "set LLAMAS_PLACEMENT=demand (or name models with --model)")
    if placed and models:
        raise SystemExit("--workers and --model: either the herder places N workers (--workers) or each "
                        "named model gets its own (--model), not both")
    workers = worker_settings()
    models = [] if placed else (models or [workers.model])
    gpus = workers.gpu_ids if gpus is None else gpus
    # Everything this process and its components write (the ledger, keys,
    # logs, Redis's and Flower's files) is for the service's user alone, and
    # a home an older version left open is closed before anything is read.
    private_files.restrict_umask()
    private_files.secure_home(settings.home)
    # Before the ports: a stale set holds them, and its message says more.
    refuse_if_running(settings.home)
    check_port(port, "HTTP gateway", "--port")
    check_port(flower_port, "Flower dashboard", "--flower-port")
    record = RunRecord.new(settings.home / RUN_RECORD, {"gateway": port, "flower": flower_port})
    record.save()
    # Everything started from here on (the embedded Redis too) inherits the
    # token, which is how `llamas down` finds leftovers wherever they are.
    os.environ[RUN_TOKEN_ENV] = record.token
    try:
        _up(settings, record, slots, port, flower_port, models, gpus, placed)
    finally:
        record.discard()


def worker_layout(model: str, node: str, gpus: list[int]) -> list[tuple[str, dict[str, str]]]:
    """Each inference worker to start for ``model``: its node name and environment.

    One process per GPU (each sees only its own), or one for the CPU: a
    process batches its jobs in one engine, and that is the fast layout.
    """
    if not gpus:
        return [(f"llama-{model}@{node}", {"LLAMAS_MODEL": model, "LLAMAS_GPUS": ""})]
    return [(f"llama-{model}-gpu{g}@{node}", {"LLAMAS_MODEL": model, "LLAMAS_GPUS": str(g)}) for g in gpus]


def placed_layout(count: int, node: str, gpus: list[int], cores: int) -> list[tuple[str, dict[str, str]]]:
    """``count`` workers with no model for the herder to place: round-robin over the GPUs, or
    sharing the CPU's cores (llama.cpp's threads of two workers must not compete for one core)."""
    if gpus:
        return [(f"llama-{i}-gpu{gpus[i % len(gpus)]}@{node}", {"LLAMAS_GPUS": str(gpus[i % len(gpus)])})
                for i in range(count)]
    threads = str(max(1, cores // count))
    return [(f"llama-{i}@{node}", {"LLAMAS_GPUS": "", "LLAMAS_THREADS": threads}) for i in range(count)]


def _up(settings: HerderSettings, record: RunRecord, slots: int | None, port: int, flower_port: int,
        models: list[str], gpus: list[int], placed: int = 0) -> None:
    import redis

    embedded = redis_server.ensure(settings.redis_url)
    where = "embedded Valkey (nothing answered there)" if embedded else "existing server"
    console.print(f"[bold]redis[/]   {settings.redis_url} — {where}")
    if not settings.private_key_file.exists():
        signing.generate_keypair(settings.home)
        console.print(f"[bold]keys[/]    created the herder's signing key pair in {settings.home}")
    if not house_key_path(settings.home).exists():
        signing.generate_keypair(settings.home, "house")
        console.print(f"[bold]keys[/]    created the house workers' signing key pair in {settings.home}")
    specs = [registry.lookup(settings.models_file, name) for name in models]
    for spec in specs:
        registry.verify(spec)
        console.print(f"[bold]model[/]   {spec.name} id {spec.model_id[:16]}…")
    console.print(f"[bold]ledger[/]  {settings.ledger_url}")
    api_key = demo_key(settings)
    pw_file = settings.home / FLOWER_PASSWORD
    flower_pw, created = flower_password(settings.home)
    if created:
        _announce_flower_password(flower_pw, pw_file)
    if settings.admin_key:
        admin_secret, admin_where = settings.admin_key, "LLAMAS_ADMIN_KEY"
    else:
        admin_secret, created = admin_key(settings.home)
        admin_where = f"in {settings.home / ADMIN_KEY}"
        if created:
            console.print(f"[bold]admin[/]   created the admin key for the dashboard and /metrics (kept "
                          f"{admin_where})", highlight=False)

    env = dict(os.environ, LLAMAS_HOME=str(settings.home), LLAMAS_REDIS_URL=settings.redis_url)
    logs = settings.home / "logs"
    node = os.uname().nodename
    supervisor = Supervisor(report=lambda text: console.print(f"[red]{text}[/]"), record=record)
    r = redis.Redis.from_url(settings.redis_url)
    gateway, flower = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{flower_port}"
    try:
        # The worker's own defaults (a thread per slot, one engine) are the
        # fast layout; only the number of slots is passed, when asked for.
        env_slots = {"LLAMAS_SLOTS": str(slots)} if slots else {}
        workers = {
            name: supervisor.add(Component(
                name=f"worker {name.split('@')[0].removeprefix('llama-')}",
                argv=python_module(
                    "celery", "-A", "llama_tasks", "worker", "-Q", queue_for(spec.name), "-n", name, "-l", "info",
                ),
                env=dict(env, **worker_env, **env_slots),
                log=logs / f"worker-{name.split('@')[0].removeprefix('llama-')}.log",
            ))
            for spec in specs
            for name, worker_env in worker_layout(spec.name, node, gpus)
        }
        threads = worker_settings().threads or os.cpu_count() or 1
        for name, worker_env in placed_layout(placed, node, gpus, threads) if placed else []:
            short = name.split("@")[0].removeprefix("llama-")
            workers[name] = supervisor.add(Component(
                name=f"worker {short}",
                argv=python_module("celery", "-A", "llama_tasks", "worker", "--no-model", "-n", name, "-l", "info"),
                env=dict(env, **worker_env, **env_slots), log=logs / f"worker-{short}.log",
            ))
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
            # Its own HTTP protocol: uvicorn's own never times a request's headers (slowloris).
            argv=python_module("uvicorn", "router.api:app", "--http", GATEWAY_HTTP_PROTOCOL,
                               "--host", "127.0.0.1", "--port", str(port)),
            # Only the gateway serves what the admin key opens (the dashboard, /metrics).
            env=dict(env, LLAMAS_ADMIN_KEY=admin_secret), log=logs / "gateway.log",
        ))
        dashboard = supervisor.add(Component(
            name="flower",
            # Flower with /metrics behind its password too (router.local.flower).
            argv=python_module("router.local.flower", f"--port={flower_port}", "--address=127.0.0.1"),
            env=flower_env(env, flower_pw), log=logs / "flower.log",
        ))
        for worker_name, worker in workers.items():
            beat = _wait(worker.name, worker, lambda name=worker_name: r.get(HERD_PREFIX + name))
            doc = json.loads(beat)
            where = f"GPU {doc['gpus'][0]}" if doc.get("gpus") else "CPU"
            serves = doc.get("model") or "no model yet (the herder places it on demand)"
            console.print(f"[bold]worker[/]  {worker_name}: {serves}, {where}, {doc['slots']} slots batched in one "
                          f"engine, {doc.get('n_ctx', settings.n_ctx)} tokens per job, log {worker.log}")
        _wait("herder", herder, lambda: "ready." in _read(herder.log))
        console.print(f"[bold]herder[/]  herder@{node} on queue '{HERDER_QUEUE}' with beat, log {herder.log}")
        _wait("gateway", api, lambda: port_answers(port))
        _wait("flower", dashboard, lambda: port_answers(flower_port))
        _where(gateway, flower, settings.home / "demo.key", pw_file, admin_where)
        _demo(gateway, api_key, specs[0].name if specs else DEFAULT_MODEL)
        console.print("[bold]up[/] — Ctrl-C stops everything.")
        supervisor.run_forever()
    finally:
        supervisor.stop_all()
        if embedded is not None:
            embedded.stop()
        console.print("stopped.")


def flower_env(env: dict[str, str], password: str) -> dict[str, str]:
    """Flower's environment: basic auth on every page and API call.

    Through the environment, not ``--basic-auth``: a command line is readable
    by every user of the machine, a process's environment only by its owner.
    An inherited FLOWER_UNAUTHENTICATED_API would open the API again.
    """
    flower_env = {k: v for k, v in env.items() if k != "FLOWER_UNAUTHENTICATED_API"}
    flower_env["FLOWER_BASIC_AUTH"] = f"{FLOWER_USER}:{password}"
    return flower_env


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
