"""A tool-call request's latency beside a plain one, through the gateway.

Run ``python -m tests.bench.tool_latency``. One stack as ``llamas up`` runs
it (herder with beat, one SmolLM2 worker with ``--threads`` threads and a
slot per kind, the gateway, a SQLite ledger); one request at a time, temperature 0, the kinds
interleaved, ``--reps`` of each after a warm-up of each (the prompt cache
then holds each kind's prefix, as it does for a client that keeps asking):

- plain: the question, no tools;
- tools, ``auto``: the same question with two function tools offered;
- tools, ``required``: the same, a call demanded (the call grammar holds from the first token).

Reports medians of the wall time, the prompt and completion tokens of
each answer's ``usage``, and completion tokens a second. Writes
``tests/bench/results/tool_latency.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.bench import compare

RESULTS = Path(__file__).parent / "results" / "tool_latency.md"
QUESTION = [{"role": "user", "content": "What is the weather in Paris, in Celsius?"}]
TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                        "unit": {"type": "string", "enum": ["C", "F"]}},
                       "required": ["city", "unit"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "The local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]
KINDS: dict[str, dict[str, Any]] = {
    "plain": {},
    "tools, auto": {"tools": TOOLS, "tool_choice": "auto"},
    "tools, required": {"tools": TOOLS, "tool_choice": "required"},
}


def ask(client: Any, body: dict[str, Any]) -> dict[str, float]:
    started = time.perf_counter()
    reply = client.post("/v1/chat/completions", json=body)
    elapsed = time.perf_counter() - started
    if reply.status_code != 200:
        raise RuntimeError(f"{reply.status_code}: {reply.text[:500]}")
    usage = reply.json()["usage"]
    return {"s": elapsed, "prompt": usage["prompt_tokens"], "completion": usage["completion_tokens"],
            "calls": len(reply.json()["choices"][0]["message"].get("tool_calls") or [])}


def measure(url: str, api_key: str, max_tokens: int, reps: int) -> dict[str, list[dict[str, float]]]:
    import httpx

    client = httpx.Client(base_url=url, timeout=300, headers={"Authorization": f"Bearer {api_key}"})
    bodies = {kind: {"model": "smollm2", "messages": QUESTION, "max_tokens": max_tokens, "temperature": 0,
                     **extra} for kind, extra in KINDS.items()}
    for body in bodies.values():
        ask(client, body)  # warm-up: the model's pages, the prompt cache
    runs: dict[str, list[dict[str, float]]] = {kind: [] for kind in KINDS}
    for _ in range(reps):
        for kind, body in bodies.items():
            runs[kind].append(ask(client, body))
    client.close()
    return runs


def report(args: argparse.Namespace, runs: dict[str, list[dict[str, float]]]) -> str:
    plain = statistics.median(r["s"] for r in runs["plain"])
    lines = [
        "# A tool-call request beside a plain one",
        "",
        f"`python -m tests.bench.tool_latency --threads {args.threads} --reps {args.reps}` on "
        f"{datetime.date.today()}, {os.cpu_count()} cores: through the gateway of one stack (SmolLM2-135M, "
        f"{args.threads} threads, a slot per kind so each keeps its prompt cached), one request at a time, "
        f"temperature 0, max_tokens {args.max_tokens}, "
        f"medians of {args.reps} interleaved repetitions after a warm-up of each.",
        "",
        "| request | prompt tokens | completion tokens | tool calls | seconds | completion tokens/s | ÷ plain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind, rows in runs.items():
        s = statistics.median(r["s"] for r in rows)
        completion = statistics.median(r["completion"] for r in rows)
        lines.append(f"| {kind} | {statistics.median(r['prompt'] for r in rows):.0f} | {completion:.0f} "
                     f"| {statistics.median(r['calls'] for r in rows):.0f} | {s:.3f} | {completion / s:.0f} "
                     f"| {s / plain:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tests.bench.tool_latency", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="llamas-tool-bench-"))
    redis = compare.choose_redis()
    try:
        env = compare.configure(tmp, redis.url)
        # A slot per kind: each kind's prompt stays cached in its own, as for a client that keeps asking.
        slots = str(len(KINDS))
        stack = compare.Stack(env, tmp, slots=len(KINDS), herder_concurrency=2,
                              worker_env={"LLAMAS_SLOTS": slots, "LLAMAS_THREADS": str(args.threads)})
        try:
            stack.start()
            assert stack.gateway is not None
            runs = measure(stack.gateway.url, stack.api_key, args.max_tokens, args.reps)
        finally:
            stack.stop()
        text = report(args, runs)
        args.out.write_text(text)
        print(text)
    finally:
        redis.release()


if __name__ == "__main__":
    main()
