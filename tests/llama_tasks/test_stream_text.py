"""A sequence's text and log probabilities as the engine hands them on: pieces that join up to both exactly."""

from __future__ import annotations

from typing import Any

from llama_tasks.batching import _Text


def entry(token: str) -> dict[str, Any]:
    return {"token": token, "logprob": -0.5, "bytes": list(token.encode()), "top_logprobs": []}


def run(tokens: list[bytes], stops: list[str], logprobs: bool = True) -> tuple[list[tuple[str, Any]], str, bool]:
    out: list[tuple[str, Any]] = []
    text = _Text(stops, lambda piece, entries: out.append((piece, entries)), logprobs)
    stopped = False
    for token in tokens:
        if text.add(token, entry(token.decode("utf-8", "replace")) if logprobs else None):
            stopped = True
            break
    final = text.close(flush_bytes=not stopped)
    return out, final, stopped


def test_each_entry_goes_with_the_piece_that_completes_its_text() -> None:
    out, text, _ = run([b"Hello", b" wor", b"ld"], stops=["xyz"])
    assert "".join(p for p, _ in out) == text == "Hello world"
    assert [e["token"] for _, entries in out for e in entries] == ["Hello", " wor", "ld"]
    # Held back two characters for the stop string: an entry waits until its token's text is all out.
    assert out == [("Hel", [])] + [("lo w", [entry("Hello")]), ("or", [entry(" wor")]), ("ld", [entry("ld")])]


def test_the_token_that_held_the_stop_string_goes_out_last_with_what_text_is_left() -> None:
    out, text, stopped = run([b"one", b" two", b" STOP", b" more"], stops=[" STOP"])
    assert stopped and text == "one two"
    assert "".join(p for p, _ in out) == text
    assert [e["token"] for _, entries in out for e in entries] == ["one", " two", " STOP"]


def test_a_stop_token_alone_at_the_end_goes_out_with_an_empty_piece() -> None:
    out, text, stopped = run([b"abc", b"!"], stops=["!"])
    assert stopped and text == "abc"
    assert out == [("abc", [entry("abc")]), ("", [entry("!")])]


def test_a_character_split_across_tokens_is_whole_in_one_piece() -> None:
    out, text, _ = run([b"caf", "é".encode()[:1], "é".encode()[1:], b"!"], stops=[])
    assert "".join(p for p, _ in out) == text == "café!"
    assert len([e for _, entries in out for e in entries]) == 4


def test_without_logprobs_pieces_carry_none() -> None:
    out, text, _ = run([b"a", b"b"], stops=[], logprobs=False)
    assert "".join(p for p, _ in out) == text and all(entries is None for _, entries in out)
