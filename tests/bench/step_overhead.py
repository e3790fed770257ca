"""The batch engine's own work per step, outside ``llama_decode``, at 8, 32 and 64 active sequences.

Run ``python -m tests.bench.step_overhead``. On a GPU a decode step of an 8B
model takes 10–30 ms, so whatever the engine does around it per step
(admitting, sampling each sequence, detokenising, stop strings, streaming
each token) is time the GPU waits. This measures it without a GPU: the real
engine on the bundled SmolLM2, ``n`` sequences generating together, and the
engine's own clocks (``step_s`` and ``decode_s``); the difference, per step,
is what a faster decode would leave.

Three ways for each ``n``: no callback (the engine alone); each token written
to its job's Redis stream on the engine's thread (``StreamWriter`` alone);
and each token queued to a ``TokenPipe`` that sends them off the engine's
thread, as a worker does. Greedy sequences take their tokens from llama.cpp's
backend sampler, the argmax inside the decode's graph; the last two columns
run the token pipe's way with it off (the argmax of every row's logits taken
here), so what moved into ``llama_decode`` shows. Medians of ``--reps``.
Writes ``tests/bench/results/step_overhead.md``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import uuid
from pathlib import Path
from typing import Any

import redis

from llama_tasks import engine, generation, registry
from llama_tasks.batching import BatchEngine
from llama_tasks.job import Job
from llama_tasks.stream import StreamWriter, TokenPipe
from tests.prompts import PROMPTS

RESULTS = Path(__file__).parent / "results" / "step_overhead.md"
TOKENS = 48


def _streamer(writer: StreamWriter) -> generation.OnChoiceText:
    """Each piece of text to the job's stream, as ``llama_tasks.runtime`` sends it."""
    def on_text(index: int, text: str, logprobs: list[dict[str, Any]] | None) -> None:
        writer.token(text, index, logprobs)
    return on_text


def _sequences(vocab: Any, n: int, r: redis.Redis | None, pipe: TokenPipe | None) -> list[Any]:
    seqs = []
    for i in range(n):
        job = Job(job_id=uuid.uuid4().hex, attempt=1, expires_at=0.0, issued_at=0.0, max_tokens=TOKENS,
                  temperature=0.0, messages=[{"role": "user", "content": PROMPTS[i % len(PROMPTS)] + f" ({i})"}])
        on_text: generation.OnChoiceText | None = None
        if r is not None:
            on_text = _streamer(StreamWriter(r, job.job_id, 1, 60, pipe))
        seqs.extend(generation.sequences(vocab, job, on_text))
    return seqs


def measure(batch: BatchEngine, vocab: Any, n: int, r: redis.Redis | None,
            piped: bool = False) -> tuple[float, float, int]:
    """(ms per step outside llama_decode, ms of llama_decode per step, steps) of ``n`` sequences generated
    together; with ``r``, each token written to its stream (through a ``TokenPipe`` when ``piped``)."""
    pipe = TokenPipe(r).start() if r is not None and piped else None
    batch.after_step = pipe.send_now if pipe is not None else None
    steps, step_s, decode_s = batch.steps, batch.step_s, batch.decode_s
    tickets = [batch.submit(s) for s in _sequences(vocab, n, r, pipe)]
    for ticket in tickets:
        ticket.result(timeout=600)
    if pipe is not None:
        pipe.close()
    ran = batch.steps - steps
    return ((batch.step_s - step_s) - (batch.decode_s - decode_s)) / ran * 1000, \
        (batch.decode_s - decode_s) / ran * 1000, ran


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="8,32,64")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--redis", default=os.environ.get("LLAMAS_REDIS_URL", "redis://127.0.0.1:6379/0"))
    args = parser.parse_args()
    spec = registry.builtin_models()["smollm2"]
    vocab = engine.load_vocab(spec)
    r = redis.Redis.from_url(args.redis)
    rows = []
    for n in (int(x) for x in args.sizes.split(",")):
        batch = BatchEngine.load(spec.path, slots=n, n_ctx_per_slot=256, n_threads=args.threads, n_gpu_layers=0).start()
        try:
            measure(batch, vocab, n, None)  # warm-up
            alone = [measure(batch, vocab, n, None) for _ in range(args.reps)]
            direct = [measure(batch, vocab, n, r) for _ in range(args.reps)]
            piped = [measure(batch, vocab, n, r, piped=True) for _ in range(args.reps)]
        finally:
            batch.stop()
        host = BatchEngine.load(spec.path, slots=n, n_ctx_per_slot=256, n_threads=args.threads, n_gpu_layers=0,
                                backend_greedy=False).start()
        try:
            measure(host, vocab, n, None)  # warm-up
            host_piped = [measure(host, vocab, n, r, piped=True) for _ in range(args.reps)]
        finally:
            host.stop()
        row = (n, statistics.median(a[0] for a in alone), statistics.median(s[0] for s in direct),
               statistics.median(s[0] for s in piped), statistics.median(a[1] for a in alone),
               statistics.median(h[0] for h in host_piped), statistics.median(h[1] for h in host_piped))
        rows.append(row)
        print(f"{n} sequences: {row[1]:.2f} ms/step alone, {row[2]:.2f} writing each token to Redis, "
              f"{row[3]:.2f} through the token pipe (as a worker does); decode {row[4]:.1f} ms/step; "
              f"backend sampling off: {row[5]:.2f} through the pipe, decode {row[6]:.1f}", flush=True)
    lines = [
        "# The engine's work per step outside llama_decode",
        "",
        f"{datetime.date.today()}, `python -m tests.bench.step_overhead`, SmolLM2-135M Q4_1 on the CPU, "
        f"{args.threads} threads, {TOKENS} tokens per sequence, greedy, medians of {args.reps}.",
        "",
        "| active sequences | ms per step outside llama_decode | each token written to Redis on the engine's "
        "thread | each token through the token pipe (a worker) | llama_decode, ms per step "
        "| backend sampling off: through the token pipe | backend sampling off: llama_decode |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        *[f"| {n} | {alone:.2f} | {direct:.2f} | {piped:.2f} | {decode:.1f} | {host_piped:.2f} | {host_decode:.1f} |"
          for n, alone, direct, piped, decode, host_piped, host_decode in rows],
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
