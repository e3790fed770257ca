"""How ``tests.bench.compare`` starts every system, with the same threads for all.

Each function returns the exact command line (or constructor arguments) a
system is started with, so the report can print what ran. ``T`` threads for
prompt and decode everywhere; ``S`` slots (parallel sequences) where a system
has slots; every slot holds ``ctx`` tokens of context.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.processes import ROOT, CeleryProcess, poll

READY_TIMEOUT_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def inprocess_kwargs(model: str, threads: int, ctx: int) -> dict[str, Any]:
    """``Llama(**kwargs)`` of the in-process baseline: one sequence, ``threads`` for prompt and decode."""
    return {"model_path": model, "n_ctx": ctx, "n_threads": threads, "n_threads_batch": threads, "verbose": False}


def llama_cpp_server_argv(model: str, threads: int, ctx: int, port: int) -> list[str]:
    """llama-cpp-python's OpenAI server: one sequence at a time (it serialises requests)."""
    return [sys.executable, "-m", "llama_cpp.server", "--model", model, "--n_ctx", str(ctx),
            "--n_threads", str(threads), "--n_threads_batch", str(threads),
            "--host", "127.0.0.1", "--port", str(port)]


def llama_server_argv(binary: Path, model: str, threads: int, slots: int, ctx: int, port: int) -> list[str]:
    """llama.cpp's server: ``slots`` sequences batched in one context of ``slots × ctx`` tokens.

    ``-np`` given explicitly keeps the KV cache split per slot (``ctx`` each),
    as our engine splits it; ``--no-webui``: nothing but the API is served.
    """
    return [str(binary), "-m", model, "-t", str(threads), "-tb", str(threads), "-np", str(slots),
            "--cont-batching", "-c", str(slots * ctx), "--host", "127.0.0.1", "--port", str(port),
            "--no-webui"]


def our_worker_argv(queue: str, name: str, extra: list[str] | None = None) -> list[str]:
    """Our inference worker as ``llamas up`` starts it: no ``-c``, no ``-P``; its own defaults decide."""
    return [sys.executable, "-m", "celery", "-A", "llama_tasks", "worker", "-Q", queue, "-n", name,
            "-l", "info", *(extra or [])]


def thread_setting() -> str | None:
    """The worker setting (environment name) that fixes its threads, if the worker has one."""
    from llama_tasks.settings import WorkerSettings

    for field in ("threads", "n_threads"):
        if field in WorkerSettings.model_fields:
            return f"LLAMAS_{field.upper()}"
    return None


class OurWorker(CeleryProcess):
    """A real ``celery -A llama_tasks worker`` started by ``our_worker_argv`` (``CeleryProcess`` adds ``-c``)."""

    def __init__(self, queue: str, name: str, env: dict[str, str], log: Path,
                 extra: list[str] | None = None) -> None:
        self.name = f"{name}@bench"
        self.worker = self.name  # what its heartbeat goes by (``CeleryProcess.wait_ready`` looks it up)
        self.log = log
        self.argv = our_worker_argv(queue, self.name, extra)
        self._log_file = open(log, "wb")  # noqa: SIM115 (open for the worker's life; closed in stop)
        self.proc = subprocess.Popen(self.argv, cwd=ROOT, env=env, stdout=self._log_file,
                                     stderr=subprocess.STDOUT, start_new_session=True)


class Server:
    """An HTTP server subprocess in its own process group, stopped with the group."""

    def __init__(self, name: str, argv: list[str], port: int, env: dict[str, str], log_path: Path,
                 probe: str) -> None:
        self.name, self.argv, self.port, self.log_path = name, argv, port, log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 (open for the server's life; closed in stop)
        self.proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = f"http://127.0.0.1:{port}"
        self._wait(probe)

    def _wait(self, probe: str) -> None:
        import httpx

        def answers() -> bool:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited {self.proc.returncode}:\n{self.log_path.read_text()[-3000:]}")
            try:
                # llama-server answers /health with 503 while it loads the model.
                return httpx.get(self.url + probe, timeout=1.0).status_code < 500
            except httpx.HTTPError:
                return False

        if not poll(answers, READY_TIMEOUT_S, every_s=0.2):
            raise TimeoutError(f"{self.name} did not answer on {self.url}{probe}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self._log.close()
