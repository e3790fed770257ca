"""Imports flow one way: cli, local, gateway, herder → core → llama_tasks' protocol modules.

Read from the source with ``ast`` (nothing is imported), so a wrong-way import
fails here even where it is written inside a function to dodge a cycle at
import time. Imports under ``if TYPE_CHECKING:`` are type hints only and do
not count.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("llama_tasks", "router", "agent")

#: llama_tasks modules that load neither llama.cpp nor Celery: what workers and the herder
#: agree on (jobs, errors, keys, signatures, streams, heartbeats, results).
PROTOCOL = {f"llama_tasks.{m}" for m in (
    "claims", "constants", "control", "embedding_job", "errors", "faults", "heartbeat", "job", "placement", "redis_server",
    "registry", "result", "results", "scripted", "settings", "signing", "stream", "tool_calls", "tools",
)}
#: What the requester's client may use of the core: no SQL, no server code.
CLIENT_CORE = {f"router.core.{m}" for m in ("errors", "fees", "keys", "request", "settings")}

#: layer → what its modules may import (prefixes, besides the standard library and
#: third parties). The entry modules ``router`` (``router/__init__.py``) and
#: ``router.api`` assemble the rest and may import anything; nothing imports them back.
ALLOWED: dict[str, tuple[str, ...]] = {
    "router.core": ("router.core", *PROTOCOL),
    "router.herder": ("router.core", "router.herder", *PROTOCOL, "llama_tasks.embedding", "llama_tasks.engine",
                      "llama_tasks.grammar_probe",
                      "llama_tasks.lifeline", "llama_tasks.redact"),
    "router.gateway": ("router.core", "router.gateway", *PROTOCOL),
    "router.local": ("router.core", "router.local", *PROTOCOL, "llama_tasks.lifeline"),
    "router.cli": ("router.core", "router.cli", "router.client", "router.admin", "router.local", *PROTOCOL),
    # The admin's Python API on the herd (Inits): the core's functions over the herder's key and Redis.
    "router.admin": ("router.core", *PROTOCOL),
    "router.client": (*CLIENT_CORE, *PROTOCOL, "llama_tasks.redact"),
    "llama_tasks": ("llama_tasks",),
    # The agent is a requester (the client only); its offline accuracy tool runs the model in process.
    "agent": ("agent", "router.client", "llama_tasks"),
}
ENTRY = {"router", "router.api"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts and "versions" in path.parts:
                continue
            found[module_name(path)] = path
    return found


MODULES = sources()


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _walk(node: ast.AST) -> Iterator[ast.AST]:
    for child in ast.iter_child_nodes(node):
        if _type_checking_only(child):
            continue
        yield child
        yield from _walk(child)


def imports(name: str) -> set[str]:
    """The modules of ours that module ``name`` imports (a package's attribute counts as the package)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in found if m.split(".")[0] in PACKAGES}


def layer_of(name: str) -> str | None:
    return next((layer for layer in sorted(ALLOWED, key=len, reverse=True)
                 if name == layer or name.startswith(layer + ".")), None)


def wrong_way(name: str) -> list[str]:
    layer = layer_of(name)
    if name in ENTRY or layer is None:
        return []
    allowed = ALLOWED[layer]
    return sorted(m for m in imports(name)
                  if m in ENTRY or not any(m == a or m.startswith(a + ".") for a in allowed))


def cycles() -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    graph = {m: imports(m) & MODULES.keys() for m in MODULES}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    return found


def test_every_router_module_has_a_layer() -> None:
    homeless = [m for m in MODULES if m.startswith("router") and m not in ENTRY and layer_of(m) is None]
    assert homeless == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_flow_one_way(name: str) -> None:
    assert wrong_way(name) == [], f"{name} imports against the layering"


def test_no_import_cycles() -> None:
    assert cycles() == []


def test_importing_the_client_loads_no_server_code() -> None:
    """What a requester installs the client for: no SQL, no llama.cpp, no web server, no herder app."""
    code = ("import json, sys; import router.client; "
            "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('sqlalchemy', 'alembic', 'llama_cpp', 'fastapi', 'starlette', 'uvicorn') "
            "or m.startswith(('router.herder', 'router.gateway', 'router.core.service', 'llama_tasks.celery')))))")
    loaded = json.loads(subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                                       check=True).stdout)
    assert loaded == []


def test_the_checks_catch_what_they_are_for(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A core module importing the gateway, and two modules importing each other, are both caught."""
    monkeypatch.setitem(MODULES, "router.core.bad", tmp_path / "bad.py")
    monkeypatch.setitem(MODULES, "router.core.worse", tmp_path / "worse.py")
    (tmp_path / "bad.py").write_text("def f():\n    from router.gateway import deps\n    from router.core import worse\n")
    (tmp_path / "worse.py").write_text("from router.core import bad\n")
    assert wrong_way("router.core.bad") == ["router.gateway.deps"]
    assert ["router.core.bad", "router.core.worse"] in cycles()
