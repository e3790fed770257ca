"""What a stream reader is shown across attempts: each piece once, a restart only on divergence."""

from __future__ import annotations

from llama_tasks.stream import TextFollower


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
