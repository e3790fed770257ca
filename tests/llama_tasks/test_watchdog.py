"""The engine's watchdog: a sampler stuck inside C code cannot hold a worker's jobs.

llama.cpp's grammar sampler can spin for minutes on one token, in C code no
Python thread can interrupt. The stuck call is stood in for here by a sample
that waits on an event (the real pathological grammar would leave a thread
spinning in the test process); everything else is the real engine and model.
"""

from __future__ import annotations

import threading

import pytest

from llama_tasks import engine, generation, registry
from llama_tasks.batching import BatchEngine, SequenceSpec, _Active
from llama_tasks.errors import EngineFailed
from llama_tasks.job import Job

N_CTX = 512
STUCK_SEED = 4242


@pytest.fixture(scope="module")
def spec():
    return registry.builtin_models()["smollm2"]


@pytest.fixture(scope="module")
def vocab(spec):
    return engine.load_vocab(spec)


def letters(vocab, seed: int, max_tokens: int) -> SequenceSpec:
    # A grammar of 300 letters: the sequence cannot end on its own before max_tokens.
    job = Job(job_id="j", attempt=1, expires_at=0.0, issued_at=0.0, max_tokens=max_tokens, temperature=0.0,
              seed=seed, prompt="Letters:", grammar="root ::= [a-z]{300}")
    return generation.sequences(vocab, job, None)[0]


def test_a_stuck_sampler_is_cut_off_its_jobs_answered_and_the_worker_told(spec, vocab):
    release, stalls = threading.Event(), []
    stalled = BatchEngine.load(spec.path, slots=4, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0,
                               sample_limit_s=0.5, on_stall=lambda: stalls.append(True)).start()
    real = stalled._sample

    def sample(seq: _Active) -> None:
        if seq.ticket.spec.seed == STUCK_SEED and seq.completion >= 3:
            release.wait()  # the fourth token of the attacker's sequence never comes back
        real(seq)

    stalled._sample = sample  # type: ignore[method-assign]
    try:
        bystander = stalled.submit(letters(vocab, 1, 280))
        attacker = stalled.submit(letters(vocab, STUCK_SEED, 280))
        made = attacker.result(timeout=120)
        # The attacker's sequence ends as a time limit ends it: with what it made, to be paid for.
        assert made.finish_reason == "time_limit" and made.completion_tokens == 3 and made.text
        # The bystander did nothing wrong: it fails retryably, to run again on a fresh worker.
        with pytest.raises(EngineFailed, match="stalled"):
            bystander.result(timeout=120)
        assert stalls == [True]
        assert not stalled.healthy()  # its heartbeat stops vouching for it
        with pytest.raises(EngineFailed):
            stalled.submit(letters(vocab, 2, 5))
    finally:
        release.set()
    # Once the stuck call returns, the loop ends on its own without touching the answered tickets.
    assert stalled._thread is not None
    stalled._thread.join(timeout=120)
    assert not stalled._thread.is_alive()
    assert attacker.result().finish_reason == "time_limit"


def test_a_sequence_past_its_own_time_limit_inside_the_sampler_is_cut_off_too(spec, vocab):
    # A sampling step shorter than sample_limit_s still ends at the sequence's own limit.
    release, stalls = threading.Event(), []
    stalled = BatchEngine.load(spec.path, slots=2, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0,
                               sample_limit_s=600, on_stall=lambda: stalls.append(True)).start()
    real = stalled._sample

    def sample(seq: _Active) -> None:
        if seq.completion >= 1:
            release.wait()
        real(seq)

    stalled._sample = sample  # type: ignore[method-assign]
    try:
        seq = letters(vocab, STUCK_SEED, 280)
        seq.time_limit_s = 1.0
        made = stalled.submit(seq).result(timeout=120)
        assert made.finish_reason == "time_limit" and made.completion_tokens == 1
        assert stalls == [True]
    finally:
        release.set()
    assert stalled._thread is not None
    stalled._thread.join(timeout=120)
