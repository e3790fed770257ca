"""Embeddings on the real bundled SmolLM2: llama.cpp's own vectors, batched or one at a time, beside generation."""

from __future__ import annotations

import llama_cpp
import numpy as np
import pytest
from llama_cpp import Llama

from llama_tasks import embedding, embedding_job, engine, generation, registry
from llama_tasks.batching import BatchEngine
from llama_tasks.embedder import EMBED_STEP_TOKENS, Embedder
from llama_tasks.errors import BadInput, EmptyInput, InputTooLong, InvalidRequest
from llama_tasks.job import Job, validate
from tests.prompts import PROMPTS

N_CTX = 512
TEXTS = [
    "The llama is a domesticated South American camelid.",
    "Paris is the capital of France.",
    "def add(a, b):\n    return a + b",
    "Ünïcödé, emoji 🦙 and numbers 3.14159",
    *PROMPTS[:4],
]


@pytest.fixture(scope="module")
def spec():
    return registry.builtin_models()["smollm2"]


@pytest.fixture(scope="module")
def vocab(spec):
    return engine.load_vocab(spec)


@pytest.fixture(scope="module")
def batch(spec):
    started = BatchEngine.load(spec.path, slots=4, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0).start()
    yield started
    started.stop()


@pytest.fixture(scope="module")
def reference(spec):
    """llama-cpp-python's own embedding path with mean pooling: what our vectors must match."""
    return Llama(model_path=spec.path, embedding=True, pooling_type=llama_cpp.LLAMA_POOLING_TYPE_MEAN,
                 n_ctx=N_CTX, n_batch=N_CTX, n_threads=2, verbose=False)


def job(inputs, **fields) -> Job:
    return Job(job_id="j", attempt=1, expires_at=0.0, issued_at=0.0, input=inputs, **fields)


def test_vectors_match_llama_cpp_embedding_with_mean_pooling(batch, vocab, reference):
    made = embedding.run(batch, vocab, job(TEXTS))
    assert len(made.vectors) == len(TEXTS)
    for text, vector in zip(TEXTS, made.vectors, strict=True):
        expected = np.asarray(reference.embed(text, normalize=True), dtype=np.float64)
        assert vector.shape == expected.shape == (576,)
        assert float(np.linalg.norm(vector)) == pytest.approx(1.0, abs=1e-5)  # unit norm, as OpenAI's
        assert float(np.dot(vector, expected)) >= 0.999
    assert made.prompt_tokens == sum(len(reference.tokenize(t.encode())) for t in TEXTS)


def test_the_bundled_model_declares_no_pooling_and_is_mean_pooled(batch, vocab):
    embedding.run(batch, vocab, job(["hello"]))
    assert batch.embedder.declared_pooling() == llama_cpp.LLAMA_POOLING_TYPE_NONE
    assert batch.embedder.pooling == llama_cpp.LLAMA_POOLING_TYPE_MEAN
    assert embedding.size_of(vocab) == batch.embedder.n_embd == 576


@pytest.mark.parametrize(("declared", "used"), [
    (llama_cpp.LLAMA_POOLING_TYPE_NONE, llama_cpp.LLAMA_POOLING_TYPE_MEAN),
    (llama_cpp.LLAMA_POOLING_TYPE_RANK, llama_cpp.LLAMA_POOLING_TYPE_MEAN),
    (llama_cpp.LLAMA_POOLING_TYPE_MEAN, llama_cpp.LLAMA_POOLING_TYPE_MEAN),
    (llama_cpp.LLAMA_POOLING_TYPE_CLS, llama_cpp.LLAMA_POOLING_TYPE_CLS),
    (llama_cpp.LLAMA_POOLING_TYPE_LAST, llama_cpp.LLAMA_POOLING_TYPE_LAST),
])
def test_a_declared_pooling_is_used_and_none_becomes_mean(declared, used):
    assert embedding.pooling_for(declared) == used


def hand_driven(batch, inputs_per_job: list[list[list[int]]]) -> tuple[list[np.ndarray], int]:
    """The vectors of jobs queued together on an embedder driven by hand (no engine thread), and its decodes."""
    embedder = Embedder(batch.model, N_CTX, 2)
    try:
        tickets = [embedder.submit(inputs) for inputs in inputs_per_job]
        while embedder.pending():
            embedder.step()
        return [v for t in tickets for v in t.result(timeout=0)], embedder.decodes
    finally:
        embedder.close()


def test_inputs_of_many_jobs_share_one_decode_and_equal_their_vectors_one_at_a_time(batch, vocab):
    alone = [embedding.run(batch, vocab, job([t])).vectors[0] for t in TEXTS]
    tokens = [embedding.input_tokens(vocab, job([t]))[0] for t in TEXTS]
    together, decodes = hand_driven(batch, [tokens[:3], tokens[3:5], tokens[5:]])
    assert decodes == 1
    # llama.cpp's matrix kernels round differently for a decode of 100 tokens than of 10, so the
    # vectors agree to that rounding, not to the bit ...
    for a, b in zip(alone, together, strict=True):
        assert float(np.dot(a, b)) >= 0.9995
    # ... and an input's neighbours in a decode change nothing of its vector: the same input beside other
    # inputs of the same lengths (the same kernels) comes out bit for bit the same.
    others = [[5] * len(t) for t in tokens[1:]]
    beside_others, _ = hand_driven(batch, [[tokens[0]], others])
    assert np.array_equal(beside_others[0], together[0])


def test_a_decode_takes_at_most_the_step_budget_and_a_longer_input_goes_alone(batch, vocab):
    embedder = Embedder(batch.model, N_CTX, 2)
    try:
        long = [1] * (EMBED_STEP_TOKENS - 10)
        tickets = [embedder.submit([long]), embedder.submit([[2] * 20]), embedder.submit([[3] * (N_CTX - 1)])]
        assert embedder.step() == 1  # 502 + 20 would pass the budget
        assert embedder.step() == 1
        assert embedder.step() == 1  # past the budget, alone
        assert all(len(t.result(timeout=0)) == 1 for t in tickets)
    finally:
        embedder.close()


def test_generation_beside_embeddings_gives_the_same_text(batch, vocab):
    seq = generation.sequences(vocab, Job(job_id="g", attempt=1, expires_at=0.0, issued_at=0.0, max_tokens=32,
                                          temperature=0.0, messages=[{"role": "user", "content": PROMPTS[0]}]),
                               None)[0]
    alone = batch.submit(seq).result(timeout=120).text
    ticket = batch.submit(seq)
    embedded = [batch.embed(embedding.input_tokens(vocab, job(TEXTS))) for _ in range(3)]
    assert ticket.result(timeout=120).text == alone
    assert all(len(e.result(timeout=120)) == len(TEXTS) for e in embedded)


def test_token_arrays_are_embedded_as_given(batch, vocab):
    tokens = vocab.tokenize(TEXTS[0].encode(), add_bos=True, special=False)
    from_text = embedding.run(batch, vocab, job([TEXTS[0]])).vectors[0]
    from_tokens = embedding.run(batch, vocab, job([tokens])).vectors[0]
    assert np.allclose(from_text, from_tokens, atol=1e-5)


def test_an_input_past_the_context_is_refused_with_both_numbers(batch, vocab):
    with pytest.raises(InputTooLong) as refused:
        embedding.run(batch, vocab, job(["hi", "llama " * 600]))
    assert refused.value.param == "input[1]" and refused.value.n_ctx == N_CTX and refused.value.tokens > N_CTX


def test_a_token_the_vocabulary_lacks_is_refused(vocab):
    with pytest.raises(BadInput, match="vocabulary of 49152"):
        embedding.input_tokens(vocab, job([[1, 2, 49152]]))


@pytest.mark.parametrize(("inputs", "error"), [
    ([], EmptyInput), ([""], EmptyInput), ([[]], EmptyInput), (["ok", 3], BadInput), ([[1, -2]], BadInput),
    ([[1, True]], BadInput), ("text", BadInput), (["x"] * (embedding_job.MAX_INPUTS + 1), BadInput),
    (["\ud800"], BadInput),
])
def test_bad_inputs_are_refused_before_any_model_is_needed(inputs, error):
    with pytest.raises(error):
        validate(job(inputs), None)


@pytest.mark.parametrize("fields", [{"prompt": "x"}, {"n": 2}, {"logprobs": True}, {"stop": ["x"]},
                                    {"grammar": "root ::= \"a\""}, {"dimensions": 0},
                                    {"tools": [{"type": "function", "function": {"name": "f"}}]},
                                    {"tool_choice": "required"}, {"parallel_tool_calls": False}])
def test_generation_fields_are_refused_on_an_embedding_job(fields):
    with pytest.raises(InvalidRequest):
        validate(job(["x"], **fields), None)


def test_dimensions_without_input_are_refused():
    with pytest.raises(BadInput, match="dimensions"):
        validate(Job(job_id="j", attempt=1, expires_at=0.0, issued_at=0.0, prompt="x", dimensions=8), None)


def test_the_four_openai_input_shapes():
    assert embedding_job.as_inputs("a") == ["a"]
    assert embedding_job.as_inputs(["a", "b"]) == ["a", "b"]
    assert embedding_job.as_inputs([1, 2]) == [[1, 2]]
    assert embedding_job.as_inputs([[1], [2]]) == [[1], [2]]
    with pytest.raises(BadInput):
        embedding_job.as_inputs(None)


def test_vectors_travel_as_little_endian_float32_base64():
    vector = embedding.normalized(np.array([3.0, 4.0, 0.0]))
    text = embedding.encode_vector(vector)
    assert embedding_job.decode_vector(text) == pytest.approx([0.6, 0.8, 0.0])
    assert embedding_job.encode_floats(embedding_job.decode_vector(text)) == text
    assert embedding_job.dimensions_of(text) == 3
    for junk in ("", "not base64!", "AAA=", 12, None):
        assert embedding_job.dimensions_of(junk) == 0


def test_a_context_smaller_than_the_step_budget_bounds_each_decode(batch):
    embedder = Embedder(batch.model, 128, 2)
    try:
        tickets = [embedder.submit([[1] * 100]), embedder.submit([[2] * 100])]
        assert embedder.step() == 1 and embedder.step() == 1
        assert all(len(t.result(timeout=0)) == 1 for t in tickets)
    finally:
        embedder.close()


def test_generation_waits_at_most_one_embedding_decode_between_its_steps(batch, vocab):
    seq = generation.sequences(vocab, Job(job_id="g", attempt=1, expires_at=0.0, issued_at=0.0, max_tokens=40,
                                          temperature=0.0, messages=[{"role": "user", "content": PROMPTS[1]}]),
                               None)[0]
    seen: list[tuple[int, bool]] = []  # (generation steps so far, generating?) at each embedding decode
    real_step = batch.embedder.step
    ticket = None

    def step() -> int:
        done = real_step()
        if done:
            seen.append((batch.steps, ticket is not None and not ticket.done()))
        return done

    batch.embedder.step = step  # type: ignore[method-assign]
    try:
        ticket = batch.submit(seq)
        # 3,000 tokens of inputs: several decodes of at most 512 tokens each.
        jobs = [batch.embed([[7] * 100] * 5) for _ in range(6)]
        assert all(len(j.result(timeout=120)) == 5 for j in jobs)
        ticket.result(timeout=120)
    finally:
        batch.embedder.step = real_step  # type: ignore[method-assign]
    assert len(seen) >= 6
    while_generating = [steps for steps, generating in seen if generating]
    assert len(while_generating) >= 2
    # Between two embedding decodes made while the sequence generated, it took a step of its own.
    assert all(b > a for a, b in zip(while_generating, while_generating[1:]))
