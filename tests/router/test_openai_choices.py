"""Several choices, logprobs and cached prompt tokens through the HTTP gateway, in OpenAI's shapes.

In process: the real gateway, herder core, SQLite ledger and Redis, with a
scripted worker in the sender: it answers each dispatched job at once with a
result document written by the test, which the herder settles and forwards
as it would a real worker's.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from llama_tasks import registry, signing
from llama_tasks import stream as token_stream
from llama_tasks.constants import HERD_PREFIX
from router.core import ledger
from router.core.models import JobRow
from router.core.service import HerderService
from router.core.settings import HerderSettings
from router.gateway.app import create_app
from router.gateway.openai_shapes import legacy_logprobs
from router.herder import stub

DEPOSIT = 100_000
MODEL = "scripted"


class ScriptedGateway:
    """The gateway over a herder whose one worker answers with ``self.script``."""

    def __init__(self, svc: HerderService, key: str, r: Any = None) -> None:
        self.svc, self.key, self.r = svc, key, r
        self.script: dict[str, Any] = {}
        #: What the worker streams before it answers: (choice index, text, logprob entries or None).
        self.pieces: list[tuple[int, str, list[dict[str, Any]] | None]] = []
        self.http = TestClient(create_app(lambda: svc), raise_server_exceptions=False)

    def answer(self, row: JobRow, envelope: dict[str, Any]) -> None:
        """The worker: its result document for the job's current attempt, settled at once."""
        doc = {"task_id": row.task_id, "job_id": row.id, "attempt": row.attempt, "worker": "scripted@test",
               "model": row.model, "model_id": self.svc.counter.model_id(row.model),
               "prompt_tokens": row.prompt_tokens, "timings": {}, **self.script}
        assert row.task_id is not None
        if self.pieces:
            writer = token_stream.StreamWriter(self.r, row.id, row.attempt, 60)
            writer.start("scripted@test", 0)
            for index, text, logprobs in self.pieces:
                writer.token(text, index, logprobs)
            writer.end(self.script["choices"][0]["finish_reason"])
        # Signed as a house worker that received the envelope signs it.
        self.svc.on_result(row.task_id, stub.HOUSE.attest_result(doc, envelope["payload"]["attempt_secret"]))

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        reply = self.http.post(path, json={"model": MODEL, **body}, headers={"Authorization": f"Bearer {self.key}"})
        assert reply.status_code == 200, reply.text
        return dict(reply.json())

    def stream(self, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
        """The chunks of a streamed answer (``[DONE]`` checked and left out)."""
        reply = self.http.post(path, json={"model": MODEL, "stream": True, **body},
                               headers={"Authorization": f"Bearer {self.key}"})
        assert reply.status_code == 200, reply.text
        lines = [line.removeprefix("data: ") for line in reply.text.split("\n\n") if line]
        assert lines[-1] == "[DONE]"
        return [json.loads(line) for line in lines[:-1]]

    def row(self) -> JobRow:
        with self.svc.sessions.begin() as s:
            return s.query(JobRow).one()

    def balance(self) -> int:
        with self.svc.sessions.begin() as s:
            assert ledger.check(s) == []
            return ledger.balance(s, ledger.account_by_key(s, self.key))

    def tokens(self, text: str) -> int:
        return self.svc.counter.completion_tokens(MODEL, text)


class Answering(stub.StubTransport):
    """Answers every job the moment it is sent, and writes responses where the gateway waits."""

    def __init__(self, gateway: list[ScriptedGateway], r: Any) -> None:
        super().__init__(handles=r)
        self.gateway = gateway

    def send(self, row: JobRow, envelope: dict[str, Any]) -> None:
        self.gateway[0].answer(row, envelope)


@pytest.fixture
def gw(r: Any, tmp_path: Path) -> Iterator[ScriptedGateway]:
    signing.generate_keypair(tmp_path)
    settings = HerderSettings(home=tmp_path, base_fee=5, fee_per_token=3, fee_per_cached_token=1)
    registry.add_model(settings.models_file, MODEL, Path(registry.smollm2_path()))
    gateway: list[ScriptedGateway] = []
    svc = stub.build(settings, transport=Answering(gateway, r), herd=stub.StaticHerd([MODEL], 4))
    with svc.sessions.begin() as s:
        _, key = ledger.create_account(s, "choices", DEPOSIT)
    gateway.append(ScriptedGateway(svc, key, r))
    r.set(HERD_PREFIX + "scripted@test", json.dumps({"worker": "scripted@test", "model": MODEL, "slots": 4}), ex=60)
    try:
        # One event loop for every request, as a server has: the app's Redis connections belong to it.
        with gateway[0].http:
            yield gateway[0]
    finally:
        r.delete(HERD_PREFIX + "scripted@test")


def token(text: str, logprob: float, raw: list[int] | None = None) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": raw if raw is not None else list(text.encode())}


def entry(text: str, logprob: float, *alternatives: dict[str, Any], raw: list[int] | None = None) -> dict[str, Any]:
    return token(text, logprob, raw) | {"top_logprobs": list(alternatives)}


HELLO = [entry("Hello", -0.5, token("Hello", -0.5), token("Hi", -1.25)),
         entry("!", -0.125, token("!", -0.125), token(".", -2.0))]


def test_chat_lists_every_choice_with_logprobs_and_cached_tokens(gw: ScriptedGateway) -> None:
    gw.script = {"cached_tokens": 2, "choices": [
        {"index": 0, "text": "Hello!", "finish_reason": "stop", "completion_tokens": 2, "logprobs": HELLO},
        {"index": 1, "text": "Hello there, llama", "finish_reason": "length", "completion_tokens": 4,
         "logprobs": [entry("Hello", -0.5, token("Hello", -0.5), token("Hi", -1.25))]},
    ]}

    reply = gw.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Greet me."}],
                                             "max_tokens": 4, "n": 2, "logprobs": True, "top_logprobs": 2})

    row = gw.row()
    # The tokens each choice generated, as its worker signed them (4 for a text a recount finds in 6).
    completion = 2 + 4
    assert gw.tokens("Hello!") + gw.tokens("Hello there, llama") != completion
    assert row.quote == row.offered == 5 + 3 * (row.prompt_tokens + 2 * 4)
    charged = 5 + 3 * (row.prompt_tokens - 2 + completion) + 1 * 2
    assert reply["id"] == f"chatcmpl-{row.id}" and reply["object"] == "chat.completion"
    assert reply["choices"] == [
        {"index": 0, "message": {"role": "assistant", "content": "Hello!"},
         "logprobs": {"content": HELLO}, "finish_reason": "stop"},
        {"index": 1, "message": {"role": "assistant", "content": "Hello there, llama"},
         "logprobs": {"content": [{"token": "Hello", "logprob": -0.5, "bytes": [72, 101, 108, 108, 111],
                                   "top_logprobs": [{"token": "Hello", "logprob": -0.5, "bytes": [72, 101, 108, 108, 111]},
                                                    {"token": "Hi", "logprob": -1.25, "bytes": [72, 105]}]}]},
         "finish_reason": "length"},
    ]
    assert reply["usage"] == {
        "prompt_tokens": row.prompt_tokens, "completion_tokens": completion,
        "total_tokens": row.prompt_tokens + completion, "prompt_tokens_details": {"cached_tokens": 2},
        "offered": row.offered, "charged": charged, "refunded": row.offered - charged}
    assert gw.balance() == DEPOSIT - charged


def test_text_completions_give_logprobs_in_the_legacy_shape(gw: ScriptedGateway) -> None:
    # "é" arrives in two tokens of one byte each: it is one character, at one offset.
    pieces = [entry("Ll", -0.5, token("Ll", -0.5), token("L", -1.5)),
              entry("\ufffd", -0.25, token("\ufffd", -0.25), raw=[0xC3]),
              entry("\ufffd", -0.75, token("\ufffd", -0.75), raw=[0xA9]),
              entry("!", -1.0, token("!", -1.0), token(".", -1.0))]
    gw.script = {"cached_tokens": 0, "choices": [
        {"index": 0, "text": "Llé!", "finish_reason": "length", "completion_tokens": 4, "logprobs": pieces}]}

    reply = gw.post("/v1/completions", {"prompt": "Once", "max_tokens": 4, "logprobs": 1})

    assert reply["object"] == "text_completion"
    assert reply["choices"] == [{"index": 0, "text": "Llé!", "finish_reason": "length", "logprobs": {
        "tokens": ["Ll", "\ufffd", "\ufffd", "!"],
        "token_logprobs": [-0.5, -0.25, -0.75, -1.0],
        "top_logprobs": [{"Ll": -0.5}, {"\ufffd": -0.25}, {"\ufffd": -0.75}, {"!": -1.0}],  # one alternative each
        "text_offset": [4, 6, 6, 7],  # from the start of the 4-character prompt
    }}]
    assert reply["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    # Generated in 4 tokens (é as two bytes), which is what is charged: a recount of the text finds 3.
    assert reply["usage"]["completion_tokens"] == 4 and gw.tokens("Llé!") == 3


def test_text_completions_list_every_choice_without_logprobs_unless_asked(gw: ScriptedGateway) -> None:
    gw.script = {"cached_tokens": 1, "choices": [
        {"index": i, "text": text, "finish_reason": "stop", "completion_tokens": 1, "logprobs": None}
        for i, text in enumerate(["One", "Two", "Three"])]}

    reply = gw.post("/v1/completions", {"prompt": "Count:", "max_tokens": 3, "n": 3})

    assert [(c["index"], c["text"], c["logprobs"], c["finish_reason"]) for c in reply["choices"]] == [
        (0, "One", None, "stop"), (1, "Two", None, "stop"), (2, "Three", None, "stop")]
    assert reply["usage"]["completion_tokens"] == sum(gw.tokens(t) for t in ("One", "Two", "Three"))
    assert reply["usage"]["prompt_tokens_details"] == {"cached_tokens": 1}


def test_a_worker_result_without_choices_answers_one_empty_choice(gw: ScriptedGateway) -> None:
    gw.script = {"text": "Hi.", "finish_reason": "length"}  # no choices, no cached_tokens: text elsewhere is not read

    reply = gw.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4})

    assert reply["choices"] == [{"index": 0, "message": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": "stop"}]
    row = gw.row()
    assert reply["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    assert reply["usage"]["charged"] == 5 + 3 * row.prompt_tokens


def test_the_job_record_carries_choices_and_cached_tokens(gw: ScriptedGateway) -> None:
    gw.script = {"cached_tokens": 3, "choices": [
        {"index": 0, "text": "A", "finish_reason": "stop", "completion_tokens": 1, "logprobs": None},
        {"index": 1, "text": "B", "finish_reason": "stop", "completion_tokens": 1, "logprobs": None}]}
    reply = gw.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Pick a letter."}],
                                             "max_tokens": 2, "n": 2})
    job_id = reply["id"].removeprefix("chatcmpl-")

    doc = gw.http.get(f"/jobs/{job_id}", headers={"Authorization": f"Bearer {gw.key}"}).json()

    assert (doc["state"], doc["n"]) == ("done", 2)
    response = doc["response"]
    assert response["cached_tokens"] == 3 and response["text"] == "A"
    assert [(c["index"], c["text"], c["completion_tokens"]) for c in response["choices"]] == [
        (0, "A", gw.tokens("A")), (1, "B", gw.tokens("B"))]
    assert response["completion_tokens"] == gw.tokens("A") + gw.tokens("B")


def test_legacy_text_offsets_count_characters_not_bytes() -> None:
    entries = [entry("日", -0.1), entry("本", -0.2), entry("\ufffd", -0.3, raw=[0xE8]),
               entry("\ufffd", -0.4, raw=[0xAA, 0x9E]), entry("!", -0.5)]
    shaped = legacy_logprobs(entries, start=2)
    assert shaped["text_offset"] == [2, 3, 4, 4, 5]
    assert shaped["top_logprobs"] == [{}, {}, {}, {}, {}]  # logprobs: 0 asks for no alternatives


# --- streams of every choice ----------------------------------------------------------------

def test_a_chat_stream_carries_every_choice_with_its_logprobs_and_own_finish(gw: ScriptedGateway) -> None:
    hello_there = [entry("Hello", -0.5, token("Hello", -0.5)), entry(" there", -0.25, token(" there", -0.25))]
    gw.script = {"cached_tokens": 0, "choices": [
        {"index": 0, "text": "Hello", "finish_reason": "stop", "completion_tokens": 2, "logprobs": HELLO},
        {"index": 1, "text": "Hello there", "finish_reason": "length", "completion_tokens": 2,
         "logprobs": hello_there}]}
    # Interleaved as made; choice 0's last token held a stop string and streams with no text.
    gw.pieces = [(0, "Hello", HELLO[:1]), (1, "Hello", hello_there[:1]), (1, " there", hello_there[1:]),
                 (0, "", HELLO[1:])]

    chunks = gw.stream("/v1/chat/completions", {"messages": [{"role": "user", "content": "Greet me."}],
                                                "max_tokens": 2, "n": 2, "logprobs": True, "top_logprobs": 1,
                                                "stream_options": {"include_usage": True}})

    row = gw.row()
    assert {c["id"] for c in chunks} == {f"chatcmpl-{row.id}"}
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    assert [c["delta"] for c in choices[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert [c["index"] for c in choices[:2]] == [0, 1]
    for i, final in enumerate(gw.script["choices"]):
        mine = [c for c in choices if c["index"] == i]
        assert "".join(c["delta"].get("content") or "" for c in mine) == final["text"]
        assert [e for c in mine if c.get("logprobs") for e in c["logprobs"]["content"]] == final["logprobs"]
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [final["finish_reason"]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
    assert chunks[-1]["usage"]["charged"] == row.charged and gw.balance() == DEPOSIT - row.charged


def test_a_text_stream_carries_legacy_logprobs_that_join_up_to_the_whole_answers(gw: ScriptedGateway) -> None:
    # "é" in two one-byte tokens, split across two chunks: still one character at one offset.
    pieces = [entry("Ll", -0.5, token("Ll", -0.5)), entry("\ufffd", -0.25, token("\ufffd", -0.25), raw=[0xC3]),
              entry("\ufffd", -0.75, token("\ufffd", -0.75), raw=[0xA9]), entry("!", -1.0, token("!", -1.0))]
    gw.script = {"cached_tokens": 0, "choices": [
        {"index": 0, "text": "Llé!", "finish_reason": "length", "completion_tokens": 4, "logprobs": pieces},
        {"index": 1, "text": "Ll", "finish_reason": "stop", "completion_tokens": 1, "logprobs": pieces[:1]}]}
    gw.pieces = [(0, "Ll", pieces[:2]), (1, "Ll", pieces[:1]), (0, "é!", pieces[2:])]

    chunks = gw.stream("/v1/completions", {"prompt": "Once", "max_tokens": 4, "n": 2, "logprobs": 1})

    for i, final in enumerate(gw.script["choices"]):
        mine = [c["choices"][0] for c in chunks if c["choices"] and c["choices"][0]["index"] == i]
        assert "".join(c["text"] for c in mine) == final["text"]
        joined: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for c in mine:
            for name in joined:
                joined[name] += (c["logprobs"] or {}).get(name, [])
        assert joined == legacy_logprobs(final["logprobs"], len("Once"))
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == [final["finish_reason"]]
    # Without include_usage the last chunk carries usage (as a plain answer would).
    assert chunks[-1]["usage"]["completion_tokens"] == 5
