"""Grading a chat's sentiment with the service: prompt + grammar methods, pure functions.

Each method turns the last messages of a room into one constrained request
(a prompt or chat messages, a GBNF grammar, greedy sampling) and reads the
answer back as a grade on the original agent's 1–5 scale. A three-way answer
says which side of 3 a room is on, not how far, so it maps to 4 / 3 / 2; the
agent buys above 3.

The methods here are the ones measured with ``llamas agent accuracy --method
all`` on the labelled sample; the default is the best of them for SmolLM2.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from agent.errors import UnknownMethod, UnparseableAnswer
from agent.world import ChatMessage

POSITIVE, NEGATIVE, NEUTRAL = "positive", "negative", "neutral"
LABELS = (POSITIVE, NEGATIVE, NEUTRAL)
#: Grade of each label on the 1–5 scale.
GRADE_OF_LABEL = {POSITIVE: 4, NEUTRAL: 3, NEGATIVE: 2}
#: Longest message text put into a grading prompt: three long messages must
#: still fit the context window beside the examples.
MAX_MESSAGE_CHARS = 300
#: Name of the method the agent uses unless configured otherwise.
DEFAULT_METHOD = "fewshot"


@dataclass(frozen=True)
class GradingRequest:
    """One constrained generation, in the terms of ``Herder.run``."""

    grammar: str
    max_tokens: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None

    def run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Herder.run``: greedy, so a room always gets the same grade."""
        return {"prompt": self.prompt, "messages": self.messages, "tokens": self.max_tokens,
                "grammar": self.grammar, "temperature": 0.0}

    def to_json(self) -> str:
        return json.dumps({"grammar": self.grammar, "max_tokens": self.max_tokens,
                           "prompt": self.prompt, "messages": self.messages}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "GradingRequest":
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Method:
    """A way to ask for a grade: how to build the request and how to read the answer."""

    name: str
    description: str
    build: Callable[[Sequence[ChatMessage]], GradingRequest]
    #: Answer (stripped, lower case) → grade 1–5.
    grades: dict[str, int] = field(default_factory=dict)

    def grade(self, text: str) -> int:
        """The 1–5 grade an answer means; ``UnparseableAnswer`` if it means none."""
        grade = self.grades.get(text.strip().lower())
        if grade is None:
            raise UnparseableAnswer(self.name, text)
        return grade


def label_of_grade(grade: int) -> str:
    """The sentiment a grade stands for: above 3 positive, below 3 negative."""
    return POSITIVE if grade > 3 else NEGATIVE if grade < 3 else NEUTRAL


def _line(message: ChatMessage) -> str:
    # One line per message: a newline inside a text could otherwise pose as
    # another speaker or as an answer line of the examples.
    text = " ".join(message.text.split())[:MAX_MESSAGE_CHARS]
    return f"{message.nick}: {text}"


def transcript(messages: Sequence[ChatMessage]) -> str:
    return "\n".join(_line(m) for m in messages)


def _words_grammar(words: Sequence[str], space: bool) -> str:
    prefix = " " if space else ""
    return "root ::= " + " | ".join(f'"{prefix}{w}"' for w in words)


def _examples(neutral_word: str) -> list[tuple[str, list[ChatMessage]]]:
    """Three labelled chats, none from the labelled sample; the factual one last, on purpose.

    SmolLM2-135M leans towards the label of the last example; the last one is
    the factual chat so a calm room is not pulled to either side.
    """
    def chat(*lines: tuple[str, str]) -> list[ChatMessage]:
        return [ChatMessage("0-0", nick, text) for nick, text in lines]

    return [
        (POSITIVE, chat(("kim", "I love this new game, it is so much fun!"),
                        ("lou", "Me too, the graphics are great."), ("mo", "Best purchase this year."))),
        (NEGATIVE, chat(("kim", "The delivery is late again and the box was broken."),
                        ("lou", "That is so annoying."), ("mo", "Terrible company, I want a refund."))),
        (neutral_word, chat(("kim", "The library closes at six today."),
                            ("lou", "Is it open tomorrow?"), ("mo", "Yes, from nine."))),
    ]


def _raw_fewshot(neutral_word: str) -> Callable[[Sequence[ChatMessage]], GradingRequest]:
    head = f"Classify the sentiment of each chat as positive, negative or {neutral_word}.\n\n" + "".join(
        f"Chat:\n{transcript(msgs)}\nSentiment: {label}\n\n" for label, msgs in _examples(neutral_word)
    )

    def build(messages: Sequence[ChatMessage]) -> GradingRequest:
        return GradingRequest(prompt=f"{head}Chat:\n{transcript(messages)}\nSentiment:",
                              grammar=_words_grammar((POSITIVE, NEGATIVE, neutral_word), space=True),
                              max_tokens=4)

    return build


def _chat_fewshot(messages: Sequence[ChatMessage]) -> GradingRequest:
    conversation = [{"role": "system",
                     "content": "Classify the sentiment of each chat as positive, negative or factual."}]
    for label, example in _examples("factual"):
        conversation += [{"role": "user", "content": transcript(example)}, {"role": "assistant", "content": label}]
    conversation.append({"role": "user", "content": transcript(messages)})
    return GradingRequest(messages=conversation, max_tokens=4,
                          grammar=_words_grammar((POSITIVE, NEGATIVE, "factual"), space=False))


def _raw_words(messages: Sequence[ChatMessage]) -> GradingRequest:
    return GradingRequest(prompt=f"{transcript(messages)}\n\nThe mood of this chat is",
                          grammar=_words_grammar(LABELS, space=True), max_tokens=4)


def _chat_words(messages: Sequence[ChatMessage]) -> GradingRequest:
    ask = "Grade the sentiment of this chat as positive, negative or neutral.\n\n"
    return GradingRequest(messages=[{"role": "user", "content": ask + transcript(messages)}],
                          grammar=_words_grammar(LABELS, space=False), max_tokens=4)


def _chat_digit(messages: Sequence[ChatMessage]) -> GradingRequest:
    ask = "Grade the sentiment of this chat from 1 (very negative) to 5 (very positive).\n\n"
    return GradingRequest(messages=[{"role": "user", "content": ask + transcript(messages)}],
                          grammar="root ::= [1-5]", max_tokens=2)


_WORD_GRADES = dict(GRADE_OF_LABEL)
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("fewshot", "raw prompt, 3 examples, grammar positive|negative|factual",
               _raw_fewshot("factual"), _WORD_GRADES | {"factual": 3}),
        Method("fewshot-neutral", "raw prompt, 3 examples, grammar positive|negative|neutral",
               _raw_fewshot(NEUTRAL), _WORD_GRADES),
        Method("chat-fewshot", "chat template, 3 example turns, grammar positive|negative|factual",
               _chat_fewshot, _WORD_GRADES | {"factual": 3}),
        Method("raw-words", "raw prompt 'The mood of this chat is', grammar positive|negative|neutral",
               _raw_words, _WORD_GRADES),
        Method("words", "chat template, zero-shot, grammar positive|negative|neutral",
               _chat_words, _WORD_GRADES),
        Method("digit", "chat template, zero-shot, grammar [1-5]",
               _chat_digit, {str(d): d for d in range(1, 6)}),
    )
}


def method(name: str) -> Method:
    if name not in METHODS:
        raise UnknownMethod(name, ", ".join(METHODS))
    return METHODS[name]


# --- the labelled sample ------------------------------------------------------------


@dataclass(frozen=True)
class LabelledRoom:
    """One room of the labelled sample: its messages and the sentiment a person gave it."""

    room: str
    label: str
    messages: tuple[ChatMessage, ...]


def load_sample() -> list[LabelledRoom]:
    """The labelled sample shipped with the package (``agent/data/sentiment.jsonl``)."""
    text = resources.files("agent").joinpath("data/sentiment.jsonl").read_text(encoding="utf-8")
    rooms = []
    for line in text.splitlines():
        if line.strip():
            doc = json.loads(line)
            messages = tuple(ChatMessage(f"{i}-0", m["nick"], m["text"]) for i, m in enumerate(doc["messages"]))
            rooms.append(LabelledRoom(doc["room"], doc["label"], messages))
    return rooms


def sample_path() -> str:
    """Where the shipped chat sample for demos lives (``llamas world replay`` plays it)."""
    return str(resources.files("agent").joinpath("data/chat_sample.jsonl"))
