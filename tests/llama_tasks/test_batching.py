"""The batch engine on the real bundled SmolLM2: many sequences, one context, one decode per step."""

from __future__ import annotations

import threading
from typing import Any

import llama_cpp
import numpy as np
import pytest
from llama_cpp import Llama

from llama_tasks import engine, generation, registry
from llama_tasks.batching import RUN_TOKENS, BatchEngine, SequenceSpec
from llama_tasks.errors import ContextOverflow
from llama_tasks.job import Job
from llama_tasks.result import Result
from tests.prompts import PROMPTS

N_CTX = 512
#: 300 lowercase letters: the model cannot stop early.
LONG_GRAMMAR = "root ::= [a-z]{300}"


@pytest.fixture(scope="module")
def spec():
    return registry.builtin_models()["smollm2"]


@pytest.fixture(scope="module")
def vocab(spec):
    return engine.load_vocab(spec)


@pytest.fixture(scope="module")
def single(spec):
    """llama-cpp-python's own single-sequence path, with the engine's attention kernel."""
    return Llama(model_path=spec.path, n_ctx=N_CTX, n_threads=2, n_threads_batch=2, flash_attn=True, verbose=False)


@pytest.fixture(scope="module")
def batch(spec):
    started = BatchEngine.load(spec.path, slots=8, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0).start()
    yield started
    started.stop()


def chat(vocab, content, **fields):
    values = dict(job_id="j", attempt=1, expires_at=0.0, issued_at=0.0, max_tokens=48, temperature=0.0,
                  messages=[{"role": "user", "content": content}])
    values.update(fields)
    return generation.sequences(vocab, Job(**values), None)


def reference(single, seq: SequenceSpec) -> str:
    """What llama-cpp-python alone generates greedily for ``seq``'s prompt, from an empty cache."""
    single.reset()
    out = single.create_completion(seq.tokens, max_tokens=seq.max_tokens, temperature=0.0, stop=seq.stops)
    return out["choices"][0]["text"]


# A minute of generation on two cores: in make test, not in make test-quick.
@pytest.mark.slow
def test_eight_prompts_decoded_together_equal_the_single_sequence_path(batch, vocab, single):
    seqs = [chat(vocab, p)[0] for p in PROMPTS]
    steps = batch.steps
    tickets = [batch.submit(s) for s in seqs]
    results = [t.result(timeout=300) for t in tickets]
    assert [r.text for r in results] == [reference(single, s) for s in seqs]
    # Decoded together: far fewer steps than tokens.
    assert batch.steps - steps < sum(r.completion_tokens for r in results) / 2


def test_sequences_join_and_leave_mid_batch_without_changing_answers(batch, vocab, single):
    long_seq = chat(vocab, PROMPTS[0], max_tokens=120)[0]
    started = threading.Event()
    long_seq.on_text = lambda _piece, _logprobs: started.set()
    long_ticket = batch.submit(long_seq)
    assert started.wait(120)  # the long one is generating: the others join it
    joiners = [chat(vocab, p, max_tokens=8)[0] for p in PROMPTS[1:4]]
    short = [batch.submit(s).result(timeout=120) for s in joiners]  # each joins, finishes, leaves
    long_result = long_ticket.result(timeout=300)
    assert [r.text for r in short] == [reference(single, s) for s in joiners]
    assert long_result.text == reference(single, long_seq)
    assert long_result.completion_tokens == 120 or long_result.finish_reason == "stop"


def test_a_new_sequence_goes_next_to_the_busy_slots_unless_its_cache_is_elsewhere(spec, vocab):
    # llama.cpp decodes each run of consecutive sequence ids as a micro-batch of its own: a sequence
    # placed apart from the busy ones costs a pass over the weights at every step of its life.
    idle = BatchEngine.load(spec.path, slots=6, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0)
    slots = idle._slots
    for slot in slots:
        slot.last_used = 10.0 + slot.seq_id
    slots[5].last_used = 0.0  # unused longest: where a new sequence went when that came first
    for slot in slots[1:3]:
        slot.active = object()  # type: ignore[assignment]  # busy: only whether it is counts here
    free = [slot for slot in slots if slot.active is None]
    new = chat(vocab, PROMPTS[3], max_tokens=8)[0]
    assert idle._slot_for(new, free).seq_id in (0, 3)
    # Unless another slot holds more of its own prompt than a micro-batch per step costs.
    long = chat(vocab, "Describe, in detail, how llamas were domesticated in the Andes. " * 25, max_tokens=8)[0]
    assert len(long.tokens) > RUN_TOKENS
    slots[5].cached, slots[5].owner = list(long.tokens), long.cache_key
    assert idle._slot_for(long, free).seq_id == 5
    assert idle._slot_for(new, free).seq_id in (0, 3)


def test_between_equal_places_a_new_sequence_takes_the_slot_of_its_sampling_kind(spec, vocab):
    # Attaching or detaching a slot's backend greedy chain re-plans llama.cpp's graph (milliseconds,
    # a whole step on a GPU): of two slots equal otherwise, the one already of its kind.
    idle = BatchEngine.load(spec.path, slots=5, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0)
    slots = idle._slots
    slots[2].active = object()  # type: ignore[assignment]
    slots[3].greedy = object()  # only whether it has a chain counts here
    free = [slot for slot in slots if slot.active is None]
    greedy = chat(vocab, PROMPTS[3], max_tokens=8)[0]
    sampled = chat(vocab, PROMPTS[3], max_tokens=8, temperature=0.8)[0]
    assert idle._slot_for(greedy, free).seq_id == 3
    assert idle._slot_for(sampled, free).seq_id == 1
    slots[3].greedy = None  # nothing to free: it was never a chain


def test_a_step_lists_its_sequences_in_slot_order(spec, vocab, single, monkeypatch):
    # A joining prompt in slot 0 beside a sequence generating in slot 1: written in slot order, the
    # step is one micro-batch of both plus the prompt's rest, not three.
    two = BatchEngine.load(spec.path, slots=2, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0).start()
    steps: list[list[int]] = []
    decode = llama_cpp.llama_decode

    def recording(ctx: Any, batch: Any) -> int:
        steps.append([batch.seq_id[i][0] for i in range(batch.n_tokens)])
        return decode(ctx, batch)

    monkeypatch.setattr(llama_cpp, "llama_decode", recording)
    places = iter([1, 0])

    def place(_spec: SequenceSpec, free: list[Any]) -> Any:
        want = next(places)
        return next(slot for slot in free if slot.seq_id == want)

    monkeypatch.setattr(two, "_slot_for", place)
    try:
        first = chat(vocab, PROMPTS[0], max_tokens=40)[0]
        started = threading.Event()
        first.on_text = lambda _piece, _logprobs: started.set()
        tickets = [two.submit(first)]
        assert started.wait(120)
        joiner = chat(vocab, PROMPTS[1], max_tokens=8)[0]
        tickets.append(two.submit(joiner))
        results = [t.result(timeout=120) for t in tickets]
    finally:
        two.stop()
    both = [ids for ids in steps if set(ids) == {0, 1}]
    assert both, "the joining prompt was never decoded beside the generating sequence"
    assert all(ids == sorted(ids) for ids in steps)
    assert [r.text for r in results] == [reference(single, first), reference(single, joiner)]


def test_a_cancelled_sequence_frees_its_slot_within_one_step(spec, vocab):
    one_slot = BatchEngine.load(spec.path, slots=1, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0).start()
    try:
        long_seq = chat(vocab, "Letters:", max_tokens=300, grammar=LONG_GRAMMAR)[0]
        pieces: list[str] = []
        first = threading.Event()
        at_cancel: list[int] = []

        def on_text(piece: str, _logprobs: Any) -> None:
            pieces.append(piece)
            if len(pieces) == 3:
                at_cancel.append(one_slot.steps)
                ticket.cancel()
                first.set()

        long_seq.on_text = on_text
        ticket = one_slot.submit(long_seq)
        waiting = one_slot.submit(chat(vocab, PROMPTS[1], max_tokens=4)[0])  # needs the only slot
        cancelled = ticket.result(timeout=120)
        assert first.is_set()
        assert cancelled.finish_reason == "cancelled"
        # Stopped at the step after the cancel (the stream got the text held back for stop strings).
        assert cancelled.text == "".join(pieces) and cancelled.completion_tokens < 20
        # The waiting sequence got the slot: everything after the cancel took few steps.
        after = waiting.result(timeout=120)
        assert after.completion_tokens == 4
        assert one_slot.steps - at_cancel[0] <= 1 + 1 + after.completion_tokens
    finally:
        one_slot.stop()


def test_grammars_stop_strings_and_free_text_share_a_batch(batch, vocab, single):
    digit = chat(vocab, "Rate 'what a lovely day' from 1 to 5.", grammar="root ::= [1-5]")[0]
    stopped = chat(vocab, "Count from 1 to 20 separated by commas.", max_tokens=60, stop=["7"])[0]
    schema = chat(vocab, "Give a JSON object with a mood.", max_tokens=40,
                  json_schema={"type": "object", "properties": {"mood": {"enum": ["happy", "sad"]}},
                               "required": ["mood"]})[0]
    free = chat(vocab, PROMPTS[5])[0]
    results = [t.result(timeout=300) for t in [batch.submit(s) for s in (digit, stopped, schema, free)]]
    assert results[0].text in {"1", "2", "3", "4", "5"} and results[0].finish_reason == "stop"
    assert "7" not in results[1].text and results[1].finish_reason == "stop" and "6" in results[1].text
    assert results[2].text.startswith('{') and '"mood"' in results[2].text
    assert results[3].text == reference(single, free)
    # Grammar-free sequences match llama-cpp-python alone; the stop string is cut as it cuts it.
    assert results[1].text == reference(single, stopped)


def test_a_shared_prefix_is_served_from_the_prompt_cache(spec, vocab, single):
    system = "You are a careful assistant who grades the sentiment of chat rooms. " * 6
    fresh = BatchEngine.load(spec.path, slots=2, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0).start()
    try:
        def ask(question: str) -> SequenceSpec:
            job = Job(job_id="j", attempt=1, expires_at=0.0, issued_at=0.0, max_tokens=12, temperature=0.0,
                      messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
                      logprobs=True, top_logprobs=5)
            return generation.sequences(vocab, job, None)[0]

        first, second = ask("Is 'great news everyone' positive?"), ask("Is 'the train is late again' positive?")
        a = fresh.submit(first).result(timeout=120)
        b = fresh.submit(second).result(timeout=120)
        shared = engine.prompt_tokens(vocab, Job(job_id="j", attempt=1, expires_at=0.0, issued_at=0.0,
                                                 messages=[{"role": "system", "content": system}]))
        assert a.cached_tokens == 0 and a.text == reference(single, first)
        assert b.cached_tokens >= len(shared) - 1 > 60
        assert b.cached_tokens < b.prompt_tokens
        again = fresh.submit(second).result(timeout=120)
        assert again.cached_tokens == again.prompt_tokens - 1
        # A cache hit is exactly llama.cpp's answer for the prompt decoded in the
        # same two pieces: the reused entries are the right ones. (Decoded in one
        # piece, the last bits can differ, as in llama-server.)
        k = b.cached_tokens
        single.reset()
        single.eval(second.tokens[:k])
        single.eval(second.tokens[k:])
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(single.ctx, -1), shape=(single.n_vocab(),))
        shifted = logits.astype(np.float64) - float(logits.max())
        expected = shifted - np.log(np.exp(shifted).sum())
        assert b.logprobs
        for top in b.logprobs[0]["top_logprobs"]:
            token = vocab.tokenize(bytes(top["bytes"]), add_bos=False, special=True)
            assert len(token) == 1 and top["logprob"] == pytest.approx(expected[token[0]], abs=1e-4)
        assert b.logprobs[0]["token"] == b.logprobs[0]["top_logprobs"][0]["token"]
    finally:
        fresh.stop()


def test_n_choices_differ_by_seed_and_all_are_returned(batch, vocab):
    seqs = chat(vocab, "Name a colour.", max_tokens=6, temperature=1.0, seed=11, n=3)
    assert [s.seed for s in seqs] == [11, 12, 13]
    result = generation.run(batch, seqs)
    assert len(result.choices) == 3
    assert result.completion_tokens == sum(c.completion_tokens for c in result.choices)
    again = generation.run(batch, chat(vocab, "Name a colour.", max_tokens=6, temperature=1.0, seed=11, n=3))
    assert [c.text for c in again.choices] == [c.text for c in result.choices]  # seeded: reproducible
    doc = result.result(task_id="t", job_id="j", attempt=1, model="smollm2", model_id="m", worker="w",
                        load_count=1, queue_wait_s=0.0).to_json()
    assert [c["index"] for c in doc["choices"]] == [0, 1, 2] and doc["choices"][0]["text"] == result.choices[0].text
    assert doc["completion_tokens"] == result.completion_tokens and Result.from_json(doc).to_json() == doc


def test_logprobs_describe_each_generated_token(batch, vocab, spec):
    seq = chat(vocab, PROMPTS[3], max_tokens=10, logprobs=True, top_logprobs=3)[0]
    result = batch.submit(seq).result(timeout=120)
    assert result.logprobs is not None and len(result.logprobs) == result.completion_tokens
    assert "".join(bytes(e["bytes"]).decode("utf-8", "replace") for e in result.logprobs) == result.text
    for entry in result.logprobs:
        tops = entry["top_logprobs"]
        assert len(tops) == 3 and entry["logprob"] <= 0.0
        assert [t["logprob"] for t in tops] == sorted((t["logprob"] for t in tops), reverse=True)
        assert tops[0]["token"] == entry["token"] and tops[0]["logprob"] == entry["logprob"]  # greedy took the best
    # The same numbers llama-cpp-python reports for the same tokens.
    every_logit = Llama(model_path=spec.path, n_ctx=N_CTX, n_threads=2, flash_attn=True, logits_all=True,
                        verbose=False)
    ref = every_logit.create_completion(seq.tokens, max_tokens=10, temperature=0.0, logprobs=3)
    ref = ref["choices"][0]["logprobs"]
    assert ref["tokens"] == [e["token"] for e in result.logprobs]
    for mine, theirs in zip(result.logprobs, ref["token_logprobs"]):
        assert mine["logprob"] == pytest.approx(theirs, abs=1e-3)


def test_no_logprobs_unless_asked(batch, vocab):
    result = batch.submit(chat(vocab, PROMPTS[2], max_tokens=3)[0]).result(timeout=120)
    assert result.logprobs is None


def test_a_sequence_past_its_time_limit_ends_with_what_it_made(batch, vocab):
    # What it made was streamed and is paid for (the herder charges it, like a cancel).
    streamed: list[str] = []
    seq = chat(vocab, "Letters:", max_tokens=300, grammar=LONG_GRAMMAR)[0]
    seq.time_limit_s, seq.on_text = 0.3, lambda piece, _logprobs: streamed.append(piece)
    result = batch.submit(seq).result(timeout=120)
    assert result.finish_reason == "time_limit"
    assert result.completion_tokens < 300 and "".join(streamed) == result.text
    assert len(vocab.tokenize(result.text.encode(), add_bos=False, special=False)) <= result.completion_tokens


def test_a_prompt_sharing_only_the_template_leaves_another_prompts_cache_alone(batch, vocab):
    # B shares only the chat template's opening with A: it takes the slot longest unused instead of
    # A's, so A asked again is served from its cache (the tool-call system block, a long system prompt).
    [first] = chat(vocab, "Describe, in detail, how llamas were domesticated in the Andes. " * 6, max_tokens=4)
    batch.submit(first).result(timeout=120)
    batch.submit(chat(vocab, "Hi there.", max_tokens=4)[0]).result(timeout=120)
    again = batch.submit(chat(vocab, "Describe, in detail, how llamas were domesticated in the Andes. " * 6,
                              max_tokens=4)[0])
    assert again.result(timeout=120).cached_tokens == len(first.tokens) - 1


def test_a_job_that_cannot_fit_one_slot_is_refused_with_both_numbers(batch, vocab):
    seq = chat(vocab, "hello", max_tokens=8)[0]
    seq.max_tokens = N_CTX
    with pytest.raises(ContextOverflow) as info:
        batch.submit(seq)
    assert info.value.as_dict() == {"prompt_tokens": len(seq.tokens), "max_tokens": N_CTX, "n_ctx": N_CTX}


def test_a_stream_that_fails_ends_its_own_job_and_no_other(batch, vocab, single):
    broken = chat(vocab, PROMPTS[6], max_tokens=20)[0]

    def on_text(_piece: str, _logprobs: Any) -> None:
        raise ConnectionError("the stream's Redis went away")

    broken.on_text = on_text
    healthy = chat(vocab, PROMPTS[7], max_tokens=20)[0]
    tickets = [batch.submit(broken), batch.submit(healthy)]
    with pytest.raises(ConnectionError):
        tickets[0].result(timeout=120)
    assert tickets[1].result(timeout=120).text == reference(single, healthy)


# --- the prompt cache is one account's own ----------------------------------------------

SECRET = "Remember this. The vault access code for customer Alice is 7391. Never tell anyone."


def _ask(vocab, content: str, cache_key: str, shared: tuple[str, ...] = (), system: str | None = None) -> SequenceSpec:
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    job = Job(job_id="j", attempt=1, expires_at=0.0, issued_at=0.0, max_tokens=1, temperature=0.0,
              messages=messages, cache_key=cache_key)
    return generation.sequences(vocab, job, None, shared_prefixes=shared)[0]


@pytest.fixture(scope="module")
def one_slot(spec):
    """One slot: every sequence lands where the last one was, cache and all."""
    started = BatchEngine.load(spec.path, slots=1, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0).start()
    yield started
    started.stop()


def test_the_public_part_of_a_chat_prompt_is_the_template_alone(vocab):
    seq = _ask(vocab, SECRET, "a")
    # SmolLM2's template opens with its own system prompt: public; the first word of ours is not.
    assert 10 < seq.public_tokens < len(seq.tokens) - 10
    assert seq.public_tokens == _ask(vocab, "Something else entirely.", "b").public_tokens
    text = vocab.detokenize(seq.tokens[: seq.public_tokens + 1]).decode()
    assert "Remember" not in vocab.detokenize(seq.tokens[: seq.public_tokens]).decode() and "Remember" in text


def test_another_account_never_reuses_or_learns_a_cached_prompt(one_slot, vocab):
    # The attack: B sends A's secret with a guessed last digit and reads cached_tokens.
    victim = _ask(vocab, SECRET, "account-a")
    one_slot.submit(victim).result(timeout=120)
    again = one_slot.submit(_ask(vocab, SECRET, "account-a")).result(timeout=120)
    assert again.cached_tokens == again.prompt_tokens - 1  # the owner's own cache still works
    probes = {}
    for guess in ("7391", "7000", "0000"):
        one_slot.submit(_ask(vocab, SECRET, "account-a")).result(timeout=120)  # A's prompt back in the slot
        probe = _ask(vocab, SECRET.replace("7391", guess), "account-b")
        probes[guess] = one_slot.submit(probe).result(timeout=120).cached_tokens
    # Only the template is ever served across accounts: a right guess reads like a wrong one.
    assert set(probes.values()) == {victim.public_tokens}


def test_a_prefix_the_operator_declares_shared_is_reused_across_accounts(one_slot, vocab):
    system = "You grade the sentiment of chat rooms from 1 (hostile) to 5 (warm). " * 4
    rendered = engine.render(vocab, Job(job_id="j", attempt=1, expires_at=0.0, issued_at=0.0,
                                        messages=[{"role": "system", "content": system},
                                                  {"role": "user", "content": "x"}]))[0]
    shared = (rendered[: rendered.index(system) + len(system)],)
    first = _ask(vocab, "Room one: hello!", "account-a", shared, system)
    second = _ask(vocab, "Room two: go away.", "account-b", shared, system)
    assert second.public_tokens > 40
    one_slot.submit(first).result(timeout=120)
    reused = one_slot.submit(second).result(timeout=120).cached_tokens
    assert reused == second.public_tokens
    # Undeclared, the same system prompt stays the account's own.
    private = _ask(vocab, "Room three: fine.", "account-c", (), system)
    assert one_slot.submit(private).result(timeout=120).cached_tokens == private.public_tokens < reused


def test_every_choice_streams_its_text_and_logprobs_exactly_as_its_result(batch, vocab):
    # Three choices sampled apart, a stop string held back while it might start: each choice's
    # pieces join up to its text and their entries to its logprobs, the stop's token included.
    job = Job(job_id="j", attempt=1, expires_at=0.0, issued_at=0.0, max_tokens=24, temperature=1.0, seed=11, n=3,
              logprobs=True, top_logprobs=2, stop=[" the"],
              messages=[{"role": "user", "content": "Tell me about the sea."}])
    pieces: dict[int, list[str]] = {0: [], 1: [], 2: []}
    entries: dict[int, list[dict[str, Any]]] = {0: [], 1: [], 2: []}

    order: list[int] = []

    def on_text(index: int, piece: str, logprobs: list[dict[str, Any]] | None) -> None:
        order.append(index)
        pieces[index].append(piece)
        assert logprobs is not None
        entries[index].extend(logprobs)

    result = generation.run(batch, generation.sequences(vocab, job, on_text))
    assert len({c.text for c in result.choices}) > 1  # sampled apart
    assert order != sorted(order)  # decoded together: their pieces come interleaved, as made
    for i, choice in enumerate(result.choices):
        assert "".join(pieces[i]) == choice.text
        assert entries[i] == choice.logprobs and len(entries[i]) == choice.completion_tokens


def test_backend_greedy_sampling_changes_no_answer_beside_sampled_sequences(spec, vocab, single):
    """Greedy sequences take their tokens from llama.cpp's backend sampler; sequences that sample
    (seeded, temperature above 0) or want log probabilities share their steps and still read their
    own logits: every answer is the same with backend sampling on and off."""
    def mix():
        greedy = [chat(vocab, p, max_tokens=24)[0] for p in PROMPTS[:3]]
        sampled = [chat(vocab, p, max_tokens=24, temperature=0.9, seed=7 + i)[0] for i, p in enumerate(PROMPTS[3:5])]
        with_logprobs = chat(vocab, PROMPTS[5], max_tokens=8, logprobs=True, top_logprobs=2)[0]
        return greedy, sampled, with_logprobs

    answers = {}
    for backend in (True, False):
        engine_ = BatchEngine.load(spec.path, slots=6, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0,
                                   backend_greedy=backend).start()
        try:
            greedy, sampled, with_logprobs = mix()
            tickets = [engine_.submit(s) for s in (*greedy, *sampled, with_logprobs)]
            results = [t.result(timeout=300) for t in tickets]
            attached = sum(slot.greedy is not None for slot in engine_._slots)
        finally:
            engine_.stop()
        answers[backend] = [(r.text, r.logprobs) for r in results]
        # Only the greedy sequences' slots carry a backend sampler, and only when it is on.
        assert attached == (3 if backend else 0)
    assert answers[True] == answers[False]
    assert [text for text, _ in answers[True][:3]] == [reference(single, s) for s in mix()[0]]


def test_a_slot_changes_between_backend_and_host_sampling_without_changing_answers(spec, vocab, single):
    one_slot = BatchEngine.load(spec.path, slots=1, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0).start()
    try:
        greedy = chat(vocab, PROMPTS[0], max_tokens=12)[0]
        sampled = chat(vocab, PROMPTS[1], max_tokens=12, temperature=0.9, seed=3)[0]
        first = one_slot.submit(greedy).result(timeout=120)
        assert one_slot._slots[0].greedy is not None
        middle = one_slot.submit(sampled).result(timeout=120)
        assert one_slot._slots[0].greedy is None  # detached: this sequence needed its logits
        again = one_slot.submit(chat(vocab, PROMPTS[0], max_tokens=12)[0]).result(timeout=120)
        assert one_slot._slots[0].greedy is not None
        assert first.text == again.text == reference(single, greedy)
        assert middle.completion_tokens > 0
    finally:
        one_slot.stop()
    host = BatchEngine.load(spec.path, slots=1, n_ctx_per_slot=N_CTX, n_threads=2, n_gpu_layers=0,
                            backend_greedy=False).start()
    try:
        assert host.submit(chat(vocab, PROMPTS[1], max_tokens=12, temperature=0.9, seed=3)[0]).result(
            timeout=120).text == middle.text
    finally:
        host.stop()
