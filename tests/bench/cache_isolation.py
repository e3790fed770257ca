"""What the per-account prompt cache costs on the agent's workload.

The agent grades rooms with its default method: a raw few-shot prompt whose
long head (instruction and examples) is the same for every room. This runs
the shipped labelled rooms through one batch engine on SmolLM2, four ways,
and prints the share of prompt tokens served from the cache:

- ``shared``: every job in one cache (how the engine behaved before scopes);
- ``one account``: one agent, one account (its scope);
- ``two accounts``: two agents on two accounts, their jobs interleaved;
- ``two accounts, head declared shared``: the same, with the operator
  declaring the few-shot head shared (``LLAMAS_SHARED_PREFIXES``).

Run: ``python -m tests.bench.cache_isolation [--rooms N] [--slots N]``.
"""

from __future__ import annotations

import argparse

from agent import grading, rooms
from llama_tasks import engine, generation, registry
from llama_tasks.batching import BatchEngine
from llama_tasks.job import Job


def hit_rate(batch: BatchEngine, vocab: object, prompts: list[str], keys: list[str | None],
             shared: tuple[str, ...]) -> float:
    cached = total = 0
    for prompt, key in zip(prompts, keys):
        job = Job(job_id="j", attempt=1, expires_at=0.0, issued_at=0.0, prompt=prompt, max_tokens=1,
                  temperature=0.0, cache_key=key)
        seq = generation.sequences(vocab, job, None, shared_prefixes=shared)[0]  # type: ignore[arg-type]
        result = batch.submit(seq).result(timeout=300)
        cached, total = cached + result.cached_tokens, total + result.prompt_tokens
    return cached / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rooms", type=int, default=40)
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args()
    spec = registry.builtin_models()["smollm2"]
    vocab = engine.load_vocab(spec)
    method = grading.method(grading.DEFAULT_METHOD)
    prompts = [method.build(list(room.messages)).prompt or "" for room in rooms.shipped()[: args.rooms]]
    head = prompts[0][: prompts[0].rindex("Chat:\n")]
    ways: list[tuple[str, list[str | None], tuple[str, ...]]] = [
        ("shared", [None] * len(prompts), ()),
        ("one account", ["a"] * len(prompts), ()),
        ("two accounts", ["a" if i % 2 else "b" for i in range(len(prompts))], ()),
        ("two accounts, head declared shared", ["a" if i % 2 else "b" for i in range(len(prompts))], (head,)),
    ]
    print(f"{len(prompts)} rooms, method {grading.DEFAULT_METHOD}, {args.slots} slots, SmolLM2-135M")
    print("| cache | prompt tokens served from the cache |")
    print("|---|---:|")
    for name, keys, shared in ways:
        # A fresh engine each way: no way starts with another's cache.
        batch = BatchEngine.load(spec.path, slots=args.slots, n_ctx_per_slot=2048, n_threads=2,
                                 n_gpu_layers=0).start()
        try:
            print(f"| {name} | {hit_rate(batch, vocab, prompts, keys, shared):.1%} |", flush=True)
        finally:
            batch.stop()


if __name__ == "__main__":
    main()
