"""Speculative decoding from the prompt (prompt lookup) on the real bundled SmolLM2: the same answers, fewer steps."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from llama_tasks import engine, generation, registry
from llama_tasks.batching import BatchEngine, SequenceSpec, _PromptLookup
from llama_tasks.job import Job
from tests.prompts import PROMPTS

N_CTX = 1024
#: A task that copies its prompt: most of the answer can be drafted from it.
REWRITE = ("Correct the spelling in this text and repeat it:\n"
           "The llama is a domestcated South American camelid, widely used as a meat and pack animal by Andean "
           "cultures since the pre-Columbian era. Llamas are social animals and live with others as a herd. "
           "Their wool is soft and contains only a small amount of lanolin.")


@pytest.fixture(scope="module")
def spec() -> registry.ModelSpec:
    return registry.builtin_models()["smollm2"]


@pytest.fixture(scope="module")
def vocab(spec: registry.ModelSpec) -> Any:
    return engine.load_vocab(spec)


def _engine(spec: registry.ModelSpec, draft_tokens: int, slots: int = 4) -> BatchEngine:
    return BatchEngine.load(spec.path, slots=slots, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0,
                            draft_tokens=draft_tokens).start()


# Fresh engines for each test: a slot's prompt cache, filled by an earlier test in another batch,
# is a valid but differently rounded prefix, which may tip a near tie either way.
@pytest.fixture
def plain(spec: registry.ModelSpec) -> Any:
    started = _engine(spec, 0)
    yield started
    started.stop()


@pytest.fixture
def drafting(spec: registry.ModelSpec) -> Any:
    started = _engine(spec, 8)
    yield started
    started.stop()


def chat(vocab: Any, content: str, **fields: Any) -> SequenceSpec:
    values: dict[str, Any] = dict(job_id="j", attempt=1, expires_at=0.0, issued_at=0.0, max_tokens=96,
                                  temperature=0.0, messages=[{"role": "user", "content": content}])
    values.update(fields)
    return generation.sequences(vocab, Job(**values), None)[0]


def _run(batch: BatchEngine, seqs: list[SequenceSpec]) -> list[Any]:
    return [t.result(timeout=300) for t in [batch.submit(s) for s in seqs]]


def test_a_rewrite_is_drafted_from_its_prompt_and_answers_the_same_in_fewer_steps(plain, drafting, vocab):
    before = (plain.steps, drafting.steps)
    [without] = _run(plain, [chat(vocab, REWRITE)])
    [with_drafts] = _run(drafting, [chat(vocab, REWRITE)])
    assert with_drafts.text == without.text and with_drafts.completion_tokens == without.completion_tokens
    assert with_drafts.drafted_tokens >= with_drafts.accepted_tokens > without.completion_tokens // 2
    assert without.drafted_tokens == without.accepted_tokens == 0
    # Each accepted token is a step not taken.
    assert drafting.steps - before[1] <= (plain.steps - before[0]) - with_drafts.accepted_tokens + 1


def test_answers_decoded_together_are_the_same_with_drafts(plain, drafting, vocab):
    seqs = [REWRITE, *PROMPTS[:3]]
    assert [r.text for r in _run(drafting, [chat(vocab, p) for p in seqs])] == \
        [r.text for r in _run(plain, [chat(vocab, p) for p in seqs])]


def test_sampled_answers_are_the_same_with_drafts_for_the_same_seed(plain, drafting, vocab):
    # One draw of the sequence's own RNG per token, in the same order: the same distribution, the same sample.
    seqs = [chat(vocab, p, temperature=0.9, seed=7, max_tokens=64) for p in (REWRITE, PROMPTS[1])]
    assert [r.text for r in _run(drafting, seqs)] == [r.text for r in _run(plain, seqs)]


def test_grammars_stops_and_log_probabilities_are_the_same_with_drafts(plain, drafting, vocab):
    seqs = [chat(vocab, REWRITE, stop=["herd"], logprobs=True, top_logprobs=2),
            chat(vocab, REWRITE, grammar='root ::= "The llama" [a-z ,.]+', max_tokens=40)]
    without, with_drafts = _run(plain, seqs), _run(drafting, seqs)
    assert [r.text for r in with_drafts] == [r.text for r in without]
    assert [r.finish_reason for r in with_drafts] == [r.finish_reason for r in without]
    assert [e["token"] for e in with_drafts[0].logprobs] == [e["token"] for e in without[0].logprobs]
    assert [e["logprob"] for e in with_drafts[0].logprobs] == pytest.approx([e["logprob"] for e in without[0].logprobs],
                                                                           abs=1e-3)


@pytest.mark.parametrize("ending", ["cancelled", "time_limit"])
def test_a_sequence_ended_mid_draft_frees_its_slot_for_the_next(spec, plain, vocab, ending):
    one = _engine(spec, 8, slots=1)
    try:
        started = threading.Event()
        seq = chat(vocab, REWRITE, max_tokens=200)
        seq.time_limit_s = 0.3 if ending == "time_limit" else None
        seq.on_text = lambda _piece, _logprobs: started.set()
        ticket = one.submit(seq)
        assert started.wait(120)
        if ending == "cancelled":
            ticket.cancel()
        result = ticket.result(timeout=120)
        assert result.finish_reason == ending
        assert one.busy() == 0  # its slot is free at once
        # The next sequence takes that slot (another tenant's: nothing of the last one is reused) and
        # answers as on a fresh engine.
        nxt = chat(vocab, PROMPTS[2])
        nxt.cache_key, nxt.public_tokens = "another tenant", 0
        [after] = _run(one, [nxt])
        [fresh] = _run(plain, [chat(vocab, PROMPTS[2])])
        assert after.cached_tokens == 0 and after.text == fresh.text
    finally:
        one.stop()


@pytest.mark.slow
def test_the_eight_chat_prompts_answer_the_same_with_drafts(plain, drafting, vocab):
    seqs = [chat(vocab, p, max_tokens=48) for p in PROMPTS]
    assert [r.text for r in _run(drafting, seqs)] == [r.text for r in _run(plain, seqs)]


def test_the_lookup_proposes_what_followed_the_latest_earlier_occurrence() -> None:
    lookup = _PromptLookup([1, 2, 3, 4, 5, 9, 2, 3, 7, 8])
    assert lookup.draft(4) == []  # the last two tokens (7, 8) were not seen before
    for token in (2, 3):
        lookup.append(token)
    assert lookup.draft(4) == [7, 8, 2, 3]  # after (8, 2, 3)? no: the latest (2, 3) was followed by 7, 8
    lookup.append(4)
    assert lookup.draft(3) == [5, 9, 2]  # (2, 3, 4), the longest suffix seen, was followed by 5
    assert lookup.draft(0) == []
