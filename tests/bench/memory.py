"""Resident memory of process trees, and single-slot llama-cpp-python processes to compare with.

``tree_memory(pid)`` sums, over a process and every live descendant, the
resident set (``VmRSS``: what each process has in RAM, pages shared between
processes — the mmap'd model file — counted once per process) and the
proportional set (``Pss``: shared pages split between their sharers, so the
sum is what the tree really costs). Both from ``/proc``.

``SingleSlots`` starts ``n`` processes (``python -m tests.bench.memory``),
each loading the model into one in-process ``Llama`` with one context of
``ctx`` tokens and answering one warm-up chat request, then idling until
stopped: the memory of serving ``n`` requests at once with llama-cpp-python.
They start one after the other: ``n`` loads and warm-ups at once would put
``n × threads`` spinning threads on the cores and take minutes, and the
memory they end with is the same.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.processes import ROOT, descendants

READY_TIMEOUT_S = 300.0
READY = "ready"


@dataclass(frozen=True)
class Memory:
    """What a set of processes holds in RAM, in bytes."""

    rss: int
    pss: int
    processes: int

    def __add__(self, other: Memory) -> Memory:
        return Memory(self.rss + other.rss, self.pss + other.pss, self.processes + other.processes)


def _kib(path: str, key: str) -> int:
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass  # gone meanwhile, or smaps_rollup unreadable: counts as nothing
    return 0


def process_memory(pid: int) -> Memory:
    return Memory(_kib(f"/proc/{pid}/status", "VmRSS:"), _kib(f"/proc/{pid}/smaps_rollup", "Pss:"), 1)


def tree_memory(pid: int) -> Memory:
    """RSS and PSS summed over ``pid`` and its live descendants."""
    total = Memory(0, 0, 0)
    for p in (pid, *descendants(pid)):
        total += process_memory(p)
    return total


class SingleSlots:
    """``n`` single-slot llama-cpp-python processes, each warmed up by one request."""

    def __init__(self, n: int, model: str, threads: int, ctx: int, prompt: str, max_tokens: int,
                 sampling: dict[str, Any]) -> None:
        self.argv = [sys.executable, "-m", "tests.bench.memory", "--model", model, "--threads", str(threads),
                     "--ctx", str(ctx), "--prompt", prompt, "--max-tokens", str(max_tokens),
                     "--sampling", json.dumps(sampling)]
        self.n = n
        self.procs: list[subprocess.Popen[str]] = []

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Start the processes one by one, each once the one before has answered its warm-up request."""
        deadline = time.monotonic() + timeout_s
        for _ in range(self.n):
            proc = subprocess.Popen(self.argv, cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            self.procs.append(proc)
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()  # the child prints READY after its warm-up request
            if line != READY or time.monotonic() > deadline:
                raise RuntimeError(f"a single-slot process did not get ready (said {line!r}, exit {proc.poll()})")

    def memory(self) -> Memory:
        total = Memory(0, 0, 0)
        for proc in self.procs:
            total += tree_memory(proc.pid)
        return total

    def stop(self) -> None:
        for proc in self.procs:
            if proc.stdin is not None:
                proc.stdin.close()  # the child exits at end of input
        for proc in self.procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _serve_one_slot(args: argparse.Namespace) -> None:
    from llama_cpp import Llama

    from tests.bench.peers import inprocess_kwargs

    llm = Llama(**inprocess_kwargs(args.model, args.threads, args.ctx))
    llm.create_chat_completion(messages=[{"role": "user", "content": args.prompt}], max_tokens=args.max_tokens,
                               **json.loads(args.sampling))
    print(READY, flush=True)
    sys.stdin.read()  # hold the model until the parent closes our input


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.memory",
                                description="One single-slot llama-cpp-python process (for tests.bench.compare).")
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--ctx", type=int, required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--max-tokens", type=int, required=True)
    p.add_argument("--sampling", default="{}", help="JSON object of sampling parameters")
    args = p.parse_args(argv)
    args.model = str(args.model)
    _serve_one_slot(args)


if __name__ == "__main__":
    main()
