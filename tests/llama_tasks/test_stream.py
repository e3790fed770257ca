"""What a stream reader is shown across attempts: each piece once, a restart only on divergence."""

from __future__ import annotations

import json
from typing import Any

from llama_tasks.stream import ChoicesFollower, TextFollower


def shown(events: list[dict[str, str]]) -> list[tuple[str, str]]:
    follower = TextFollower()
    out = []
    for event in events:
        for e in follower.feed(event):
            out.append((e["event"], e.get("text", "")))
    return out


def start() -> dict[str, str]:
    return {"event": "start", "attempt": "1"}


def tok(text: str) -> dict[str, str]:
    return {"event": "token", "attempt": "1", "text": text}


END = {"event": "end", "attempt": "1", "finish_reason": "length"}


def test_a_retried_attempt_that_retraces_the_text_is_silent_until_it_goes_further() -> None:
    events = [start(), tok(" Write"), start(), tok(" Write"), tok(" a"), tok(" long story"), END]
    assert shown(events) == [("token", " Write"), ("token", " a"), ("token", " long story"), ("end", "")]


def test_pieces_that_split_differently_are_still_shown_once() -> None:
    events = [start(), tok("ab"), tok("cd"), start(), tok("a"), tok("bcde"), END]
    assert "".join(t for k, t in shown(events) if k == "token") == "abcde"


def test_an_attempt_that_departs_from_what_was_shown_restarts_the_reader() -> None:
    events = [start(), tok("The cat"), start(), tok("The dog"), tok(" ran"), END]
    assert shown(events) == [("token", "The cat"), ("restart", ""), ("token", "The dog"), ("token", " ran"),
                             ("end", "")]


def test_an_attempt_that_ends_short_of_what_was_shown_restarts_the_reader() -> None:
    events = [start(), tok("Hello there"), start(), tok("Hello"), {"event": "end", "attempt": "1",
                                                                   "finish_reason": "stop"}]
    assert shown(events) == [("token", "Hello there"), ("restart", ""), ("token", "Hello"), ("end", "")]


def test_one_attempt_passes_through_unchanged() -> None:
    assert shown([start(), tok("a"), tok("b"), END]) == [("token", "a"), ("token", "b"), ("end", "")]


# --- several choices, with log probabilities ---------------------------------------------------

def ctok(index: int, text: str, *tokens: str) -> dict[str, str]:
    event = {"event": "token", "attempt": "1", "text": text, "index": str(index)}
    if tokens:
        event["logprobs"] = json.dumps([{"token": t, "logprob": -1.0, "bytes": list(t.encode()), "top_logprobs": []}
                                        for t in tokens])
    return event


def shown_choices(events: list[dict[str, str]]) -> tuple[list[dict[str, Any]], dict[int, str], dict[int, list[str]]]:
    """Every event shown, and what a reader keeps of each choice: its text and its logprob tokens."""
    follower = ChoicesFollower()
    out = [e for event in events for e in follower.feed(event)]
    text: dict[int, str] = {}
    tokens: dict[int, list[str]] = {}
    for e in out:
        if e["event"] == "restart":
            text[e["index"]], tokens[e["index"]] = "", []
        elif e["event"] == "token":
            text[e["index"]] = text.get(e["index"], "") + e["text"]
            tokens.setdefault(e["index"], []).extend(t["token"] for t in e["logprobs"] or [])
    return out, text, tokens


def test_interleaved_choices_are_each_shown_once_with_their_index() -> None:
    events = [start(), ctok(0, "A", "A"), ctok(1, "x", "x"), ctok(0, "B", "B"), ctok(2, "p", "p"), ctok(1, "y", "y"),
              END]
    out, text, tokens = shown_choices(events)
    assert [(e["index"], e["text"]) for e in out if e["event"] == "token"] == [
        (0, "A"), (1, "x"), (0, "B"), (2, "p"), (1, "y")]
    assert text == {0: "AB", 1: "xy", 2: "p"} and tokens == {0: ["A", "B"], 1: ["x", "y"], 2: ["p"]}
    assert out[-1] == END


def test_a_retry_restarts_only_the_choice_that_departs() -> None:
    first = [start(), ctok(0, "same", "same"), ctok(1, "cat", "cat")]
    again = [start(), ctok(0, "same", "same"), ctok(1, "dog", "dog"), ctok(0, " more", " more"), END]
    out, text, tokens = shown_choices(first + again)
    assert [e["index"] for e in out if e["event"] == "restart"] == [1]
    assert text == {0: "same more", 1: "dog"}
    # Each choice's logprobs are shown once, and a restarted one's are the new attempt's alone.
    assert tokens == {0: ["same", " more"], 1: ["dog"]}


def test_a_choice_the_retry_leaves_empty_is_restarted_at_the_end() -> None:
    events = [start(), ctok(0, "a", "a"), ctok(1, "b", "b"), start(), ctok(0, "a", "a"), END]
    out, text, tokens = shown_choices(events)
    assert [e["index"] for e in out if e["event"] == "restart"] == [1]
    assert text == {0: "a", 1: ""} and tokens == {0: ["a"], 1: []}
    assert out[-1] == END


def test_an_entry_streamed_with_no_text_is_shown() -> None:
    # The token that held a stop string: its entry comes with an empty piece, last.
    out, text, tokens = shown_choices([start(), ctok(0, "hi", "hi"), ctok(0, "", "!"), END])
    assert text == {0: "hi"} and tokens == {0: ["hi", "!"]}
