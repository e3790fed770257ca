"""The batch engine alone in a closed loop: tokens a second, and how scattered its slots are.

Run ``python -m tests.bench.slot_runs``. ``--concurrency`` requesters
each send the 8 chat prompts' sequences one after another (greedy, 40 to 79
tokens each, so they end at different steps) to one engine of ``--slots``
slots on the bundled SmolLM2, and the engine's ``llama_decode`` is watched
for the runs of consecutive sequence ids each step holds: llama.cpp decodes
each run as a micro-batch of its own, a pass over every weight, so 1.0 is
the best a step can do. No Celery, no Redis: the engine's batching alone.
To compare two versions, run it in each tree alternately (the cores here
are shared: compare medians of alternated runs, not one run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import threading
import time
import uuid
from typing import Any

import llama_cpp

from llama_tasks import engine, generation, registry
from llama_tasks.batching import BatchEngine, id_runs
from llama_tasks.job import Job
from tests.prompts import PROMPTS


class RunCounter:
    """Wraps ``llama_cpp.llama_decode`` to count steps and the runs of consecutive sequence ids in them."""

    def __init__(self) -> None:
        self.steps = self.runs = 0
        self._decode = llama_cpp.llama_decode

    def __enter__(self) -> RunCounter:
        llama_cpp.llama_decode = self._counted
        return self

    def __exit__(self, *_exc: object) -> None:
        llama_cpp.llama_decode = self._decode

    def _counted(self, ctx: Any, batch: Any) -> int:
        ids = {batch.seq_id[i][0] for i in range(batch.n_tokens)}
        self.steps += 1
        self.runs += id_runs(ids)
        return int(self._decode(ctx, batch))


def _sequence(vocab: Any, k: int) -> Any:
    job = Job(job_id=uuid.uuid4().hex, attempt=1, expires_at=0.0, issued_at=0.0, max_tokens=40 + 13 * (k % 4),
              temperature=0.0, messages=[{"role": "user", "content": PROMPTS[k % len(PROMPTS)]}])
    return generation.sequences(vocab, job, None)[0]


def closed_loop(batch: BatchEngine, vocab: Any, concurrency: int, each: int) -> tuple[float, float]:
    """(completion tokens a second, runs per step) of ``concurrency`` requesters sending ``each`` sequences."""
    tokens = [0] * concurrency

    def requester(k: int) -> None:
        for j in range(each):
            tokens[k] += batch.submit(_sequence(vocab, k * each + j + k)).result(timeout=600).completion_tokens

    with RunCounter() as counter:
        started = time.perf_counter()
        threads = [threading.Thread(target=requester, args=(k,)) for k in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        elapsed = time.perf_counter() - started
    return sum(tokens) / elapsed, counter.runs / max(1, counter.steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--each", type=int, default=4, help="sequences each requester sends per run")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    spec = registry.builtin_models()["smollm2"]
    vocab = engine.load_vocab(spec)
    batch = BatchEngine.load(spec.path, slots=args.slots, n_ctx_per_slot=2048, n_threads=args.threads,
                             n_gpu_layers=0).start()
    try:
        closed_loop(batch, vocab, max(args.concurrency), 1)  # warm-up
        for concurrency in args.concurrency:
            runs = [closed_loop(batch, vocab, concurrency, args.each) for _ in range(args.reps)]
            print(f"concurrency {concurrency} on {args.slots} slots: "
                  f"{statistics.median(r[0] for r in runs):.1f} tokens/s, "
                  f"{statistics.median(r[1] for r in runs):.2f} runs of sequence ids a step "
                  f"(each run: {', '.join(f'{r[0]:.1f} tok/s {r[1]:.2f}' for r in runs)})", flush=True)
    finally:
        batch.stop()


if __name__ == "__main__":
    main()
