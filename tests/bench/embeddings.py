"""Embeddings throughput: llamas' gateway beside in-process llama-cpp-python and llama.cpp's ``llama-server``.

Run ``python -m tests.bench.embeddings``. On the bundled SmolLM2 GGUF (or
``--model``), with the same ``T`` threads for every system (``--threads``,
default 2), it embeds ``N`` short texts (``--inputs``, default 64) and
reports inputs a second and input tokens a second, the median of
``--reps`` repetitions after one warm-up:

1. in-process llama-cpp-python, ``Llama(embedding=True, pooling_type=MEAN,
   n_threads=T).embed(texts)``: its own batching (512 tokens a decode), no
   serving at all: the floor of what any server of these kernels can reach;
2. llama.cpp's ``llama-server --embedding --pooling mean -np S`` (``--llama-server PATH``, or
   ``tests.bench.llama_server``'s build for the installed llama-cpp-python: ``--build`` builds it
   if missing, else it is left out when absent);
3. ours: herder with beat, one inference worker (``LLAMAS_SLOTS=S``), the
   HTTP gateway and a SQLite ledger (``tests.bench.compare.Stack``), every
   request paid for.

Each server is asked two ways: one request carrying all ``N`` texts, and
``N`` requests of one text each, ``S`` in flight at once (what many small
clients send; the server must batch across requests). Writes
``tests/bench/results/embeddings.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.bench import compare, llama_server, peers

RESULTS = Path(__file__).parent / "results" / "embeddings.md"
#: Context of one slot, for every system.
CTX = 512
SUBJECTS = ["llamas", "alpacas", "the weather", "a stock market", "coffee", "the sea", "old maps", "trains"]

#: ``send(texts) -> input tokens`` one way of asking a system; raises on any failure.
Send = Callable[[list[str]], int]


def texts(n: int) -> list[str]:
    """``n`` short, distinct sentences (about 10 tokens each)."""
    return [f"Note {i}: a short sentence about {SUBJECTS[i % len(SUBJECTS)]} and number {i * 7}." for i in range(n)]


def http_send(base_url: str, api_key: str | None, extra: dict[str, Any]) -> Send:
    import httpx

    client = httpx.Client(base_url=base_url, timeout=300, headers={"Authorization": f"Bearer {api_key or 'none'}"})

    def send(batch: list[str]) -> int:
        reply = client.post("/v1/embeddings", json={"model": "smollm2", "input": batch, **extra})
        if reply.status_code != 200:
            raise RuntimeError(f"{reply.status_code} from {base_url}: {reply.text[:500]}")
        doc = reply.json()
        if len(doc["data"]) != len(batch):
            raise RuntimeError(f"{len(doc['data'])} vectors for {len(batch)} inputs")
        return int(doc["usage"]["prompt_tokens"])

    return send


def one_request(send: Send) -> Callable[[list[str]], int]:
    return send


def one_per_text(send: Send, in_flight: int) -> Callable[[list[str]], int]:
    """Every text its own request, ``in_flight`` at a time."""

    def run(batch: list[str]) -> int:
        with ThreadPoolExecutor(in_flight) as pool:
            return sum(pool.map(lambda t: send([t]), batch))

    return run


def timed(run: Callable[[list[str]], int], batch: list[str], reps: int) -> dict[str, float]:
    """Median seconds of ``reps`` runs after one warm-up, and the rates they give."""
    run(batch)
    seconds, tokens = [], 0
    for _ in range(reps):
        started = time.perf_counter()
        tokens = run(batch)
        seconds.append(time.perf_counter() - started)
    s = statistics.median(seconds)
    return {"s": s, "inputs_per_s": len(batch) / s, "tokens_per_s": tokens / s, "tokens": tokens}


def inprocess(model: str, threads: int, batch: list[str], reps: int) -> dict[str, float]:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=model, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                          n_ctx=CTX, n_threads=threads, n_threads_batch=threads, verbose=False)

    def run(texts_: list[str]) -> int:
        llm.embed(texts_, normalize=True)
        return sum(len(llm.tokenize(t.encode())) for t in texts_)

    return timed(run, batch, reps)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2, help="threads for prompt processing, every system")
    p.add_argument("--slots", type=int, default=8, help="parallel sequences of the servers (ours, llama-server)")
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2)")
    p.add_argument("--build", action="store_true", help="build llama-server if it is missing")
    p.add_argument("--llama-server", type=Path, default=None,
                   help="a llama-server binary (default: tests.bench.llama_server's, for the installed llama-cpp-python)")
    p.add_argument("--out", type=Path, default=RESULTS)
    return p.parse_args(argv)


def measure_llama_server(args: argparse.Namespace, model: str, env: dict[str, str], tmp: Path,
                         batch: list[str]) -> dict[str, dict[str, float]] | str:
    binary = args.llama_server or llama_server.binary_path()
    if not binary.exists():
        if not args.build:
            return f"not measured: no llama-server at {binary} (run with --build)"
        binary = llama_server.ensure()
    port = peers.free_port()
    argv = [*peers.llama_server_argv(binary, model, args.threads, args.slots, CTX, port), "--embedding",
            "--pooling", "mean"]
    server = peers.Server("llama-server", argv, port, env, tmp / "llama-server.log", "/health")
    try:
        send = http_send(server.url, None, {})
        return {"one request": timed(one_request(send), batch, args.reps),
                "one per text": timed(one_per_text(send, args.slots), batch, args.reps),
                # Shown by file name: where this machine keeps them says nothing about the run.
                "argv": " ".join(["llama-server", *(Path(a).name if a == model else a for a in argv[1:])])}  # type: ignore[dict-item]
    finally:
        server.stop()


def measure_ours(args: argparse.Namespace, env: dict[str, str], tmp: Path,
                 batch: list[str]) -> dict[str, dict[str, float]]:
    stack = compare.Stack(dict(env, LLAMAS_N_CTX=str(CTX)), tmp, slots=args.slots, herder_concurrency=2,
                          worker_env={"LLAMAS_SLOTS": str(args.slots), "LLAMAS_THREADS": str(args.threads),
                                      "LLAMAS_N_CTX": str(CTX)})
    try:
        stack.start()  # inside: a stack that fails to start still stops what it started
        assert stack.gateway is not None
        send = http_send(stack.gateway.url, stack.api_key, {})
        return {"one request": timed(one_request(send), batch, args.reps),
                "one per text": timed(one_per_text(send, args.slots), batch, args.reps)}
    finally:
        stack.stop()


def row(name: str, way: str, m: dict[str, float], floor: float) -> str:
    return (f"| {name} | {way} | {m['s']:.2f} | {m['inputs_per_s']:.0f} | {m['tokens_per_s']:.0f} "
            f"| {m['tokens_per_s'] / floor:.2f} |")


def report(args: argparse.Namespace, model: str, batch: list[str], base: dict[str, float],
           server: dict[str, Any] | str, ours: dict[str, dict[str, float]]) -> str:
    floor = base["tokens_per_s"]
    lines = [
        "# Embeddings throughput",
        "",
        f"`python -m tests.bench.embeddings --threads {args.threads} --slots {args.slots} --inputs {args.inputs} "
        f"--reps {args.reps}` on {datetime.date.today()}: "
        f"{platform.machine()}, {os.cpu_count()} cores, model `{Path(model).name}`, {args.threads} threads for every "
        f"system, {len(batch)} texts of {base['tokens'] / len(batch):.1f} tokens on average "
        f"({int(base['tokens'])} in all), median of {args.reps} runs after a warm-up; servers with {args.slots} "
        f"slots of {CTX} tokens. \"one per text\": {len(batch)} requests of one text, {args.slots} in flight.",
        "",
        "| system | asked as | seconds | inputs/s | tokens/s | ÷ in-process |",
        "|---|---|---:|---:|---:|---:|",
        row("llama-cpp-python in process (`Llama.embed`)", "one call", base, floor),
    ]
    if isinstance(server, str):
        lines.append(f"| llama-server `--embedding` | — | {server} | | | |")
    else:
        lines += [row("llama-server `--embedding --pooling mean`", way, server[way], floor)
                  for way in ("one request", "one per text")]
    lines += [row("llamas (gateway, paid)", way, ours[way], floor) for way in ("one request", "one per text")]
    if not isinstance(server, str):
        lines += ["", f"llama-server ran as `{server['argv']}`."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    tmp = Path(tempfile.mkdtemp(prefix="llamas-embed-bench-"))
    redis = compare.choose_redis()
    try:
        env = compare.configure(tmp, redis.url)
        from llama_tasks import registry

        model = str(args.model or registry.smollm2_path())
        batch = texts(args.inputs)
        compare.log("in process")
        base = inprocess(model, args.threads, batch, args.reps)
        compare.log("llama-server")
        server = measure_llama_server(args, model, env, tmp, batch)
        compare.log("ours")
        ours = measure_ours(args, env, tmp, batch)
        text = report(args, model, batch, base, server, ours)
        args.out.write_text(text)
        print(text)
    finally:
        redis.release()


if __name__ == "__main__":
    main()
