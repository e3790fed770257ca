"""Grading a chat's sentiment with the service: the methods, as pure functions.

Each method turns the last messages of a room into one request (a prompt or
chat messages, greedy sampling) and reads the response back as a grade on the
original agent's 1–5 scale; the agent buys above 3.

- *Probability* methods (``prob-…``, the default) ask for one token with its
  likeliest alternatives and grade by the expected value of the calibrated
  label distribution (``agent.scoring``): the grade says how positive, not
  only which side.
- *Word* methods ask for a whole answer word under a grammar and map it to
  4 / 3 / 2: which side of 3 a room is on, not how far.

The methods were compared with ``llamas agent accuracy --split tune --method
all --refit`` on the tuning half of the labelled rooms only (``agent.rooms``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from agent import scoring
from agent.calibration import CONTENT_FREE_PRIORS, FITTED
from agent.errors import UnknownMethod, UnparseableAnswer
from agent.scoring import NEGATIVE, NEUTRAL, POSITIVE, Affine, Calibration, Distribution
from agent.world import ChatMessage

LABELS = (POSITIVE, NEGATIVE, NEUTRAL)
#: Grade of each label on the 1–5 scale.
GRADE_OF_LABEL = {POSITIVE: 4, NEUTRAL: 3, NEGATIVE: 2}
#: Longest message text put into a grading prompt: three long messages must
#: still fit the context window beside the examples.
MAX_MESSAGE_CHARS = 300
#: Name of the method the agent uses unless configured otherwise (chosen on the tuning half).
DEFAULT_METHOD = "prob-news"


@dataclass(frozen=True)
class GradingRequest:
    """One constrained generation, in the terms of ``Herder.run``."""

    grammar: str
    max_tokens: int
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    #: With more than 0, the response carries the log probabilities of this many
    #: likeliest alternatives at each generated token.
    top_logprobs: int = 0

    def run_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``Herder.run``: greedy, so a room always gets the same grade."""
        kwargs: dict[str, Any] = {"prompt": self.prompt, "messages": self.messages, "tokens": self.max_tokens,
                                  "grammar": self.grammar, "temperature": 0.0}
        if self.top_logprobs:
            kwargs |= {"logprobs": True, "top_logprobs": self.top_logprobs}
        return kwargs

    def to_json(self) -> str:
        return json.dumps({"grammar": self.grammar, "max_tokens": self.max_tokens, "prompt": self.prompt,
                           "messages": self.messages, "top_logprobs": self.top_logprobs}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> GradingRequest:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class Reading:
    """What a response says about a room: its 1–5 grade, its label and, for a probability
    method, the label distribution before and after calibration."""

    grade: float
    label: str
    raw: Distribution | None = None
    calibrated: Distribution | None = None


@dataclass(frozen=True)
class Method:
    """A way to ask for a grade: how to build the request and how to read the answer."""

    name: str
    description: str
    build: Callable[[Sequence[ChatMessage]], GradingRequest]
    #: Word method: answer (stripped, lower case) → grade 1–5.
    grades: dict[str, int] = field(default_factory=dict)
    #: Probability method: the request for a transcript, and the answer word → label.
    template: Callable[[str], GradingRequest] | None = None
    words: dict[str, str] = field(default_factory=dict)

    @property
    def scores_probabilities(self) -> bool:
        return self.template is not None

    def grade(self, text: str) -> int:
        """The 1–5 grade a word answer means; ``UnparseableAnswer`` if it means none."""
        grade = self.grades.get(text.strip().lower())
        if grade is None:
            raise UnparseableAnswer(self.name, text)
        return grade

    def content_free_requests(self) -> list[GradingRequest]:
        """The requests whose answers measure the prompt's bias (``scoring.CONTENT_FREE`` as the chat)."""
        if self.template is None:
            return []
        return [self.template(text) for text in scoring.CONTENT_FREE]

    def distribution(self, response: dict[str, Any]) -> Distribution:
        """The uncalibrated label probabilities of a response's first token."""
        return scoring.label_probabilities(scoring.first_alternatives(response, self.name), self.words)

    def read(self, response: dict[str, Any], calibration: Calibration = None) -> Reading:
        """The grade a done response gives; ``UnparseableAnswer`` if it gives none.

        ``calibration`` is the method's for the model that answered: its
        content-free distribution, an ``Affine`` map, or None (uncalibrated).
        A probability method's label is the likeliest calibrated one; its
        grade the expected value.
        """
        if self.template is None:
            grade = self.grade(str(response.get("text") or ""))
            return Reading(grade, label_of_grade(grade))
        raw = self.distribution(response)
        calibrated = scoring.calibrate(raw, calibration)
        return Reading(scoring.expected_grade(calibrated), scoring.most_likely(calibrated),
                       scoring.normalise(raw), calibrated)


def label_of_grade(grade: float) -> str:
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
    head = _fewshot_head(_examples(neutral_word), neutral_word)

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


def _more_examples(neutral_word: str) -> list[tuple[str, list[ChatMessage]]]:
    """Six labelled chats (none from the labelled rooms): calm bad news, sarcasm and a
    one-line room beside the plain ones, so those read as what they are; factual last."""
    def chat(*lines: tuple[str, str]) -> list[ChatMessage]:
        return [ChatMessage("0-0", nick, text) for nick, text in lines]

    return [
        (POSITIVE, chat(("kim", "I love this new game, it is so much fun!"), ("lou", "Me too, the graphics are great."))),
        (NEGATIVE, chat(("kim", "The insurer wrote back. They will not cover the repair."),
                        ("lou", "So we pay all of it ourselves."))),
        (neutral_word, chat(("kim", "The library closes at six today."), ("lou", "Is it open tomorrow?"),
                            ("mo", "Yes, from nine."))),
        (NEGATIVE, chat(("kim", "Oh wonderful, the heating broke again. Just what I needed."),
                        ("lou", "Lovely, another cold night."))),
        (POSITIVE, chat(("kim", "Passed!"),)),
        (neutral_word, chat(("kim", "The bus leaves at 7:40 from platform 2."), ("lou", "Thanks."))),
    ]


#: The default method's question: asking about news rather than "sentiment" (tried on the
#: tuning half beside no instruction and the classification one) separates calm bad news best.
NEWS_QUESTION = "Does each chat bring good news, bad news or no news?\n\n"


def _fewshot_head(examples: list[tuple[str, list[ChatMessage]]], neutral_word: str,
                  instruction: str | None = None) -> str:
    if instruction is None:
        instruction = f"Classify the sentiment of each chat as positive, negative or {neutral_word}.\n\n"
    return instruction + "".join(f"Chat:\n{transcript(msgs)}\nSentiment: {label}\n\n" for label, msgs in examples)


def _prob_fewshot(examples: list[tuple[str, list[ChatMessage]]], neutral_word: str,
                  instruction: str | None = None) -> Callable[[str], GradingRequest]:
    head = _fewshot_head(examples, neutral_word, instruction)
    grammar = _words_grammar((POSITIVE, NEGATIVE, neutral_word), space=True)

    def template(chat: str) -> GradingRequest:
        return GradingRequest(prompt=f"{head}Chat:\n{chat}\nSentiment:", grammar=grammar, max_tokens=1,
                              top_logprobs=scoring.TOP_LOGPROBS)

    return template


def _prob_raw(chat: str) -> GradingRequest:
    return GradingRequest(prompt=f"{chat}\n\nThe mood of this chat is", grammar=_words_grammar(LABELS, space=True),
                          max_tokens=1, top_logprobs=scoring.TOP_LOGPROBS)


def _prob_chat(chat: str) -> GradingRequest:
    ask = "Grade the sentiment of this chat as positive, negative or neutral.\n\n"
    return GradingRequest(messages=[{"role": "user", "content": ask + chat}],
                          grammar=_words_grammar(LABELS, space=False), max_tokens=1,
                          top_logprobs=scoring.TOP_LOGPROBS)


def _probability(name: str, description: str, template: Callable[[str], GradingRequest],
                 neutral_word: str = NEUTRAL) -> Method:
    return Method(name, description, lambda messages: template(transcript(messages)), template=template,
                  words={POSITIVE: POSITIVE, NEGATIVE: NEGATIVE, neutral_word: NEUTRAL})


_WORD_GRADES = dict(GRADE_OF_LABEL)
METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        _probability("prob-news", "P(label) after the 3-example raw prompt asking about news, fitted calibration",
                     _prob_fewshot(_examples("factual"), "factual", NEWS_QUESTION), "factual"),
        _probability("prob-fewshot", "P(label) after the 3-example raw prompt, calibrated, expected grade",
                     _prob_fewshot(_examples("factual"), "factual"), "factual"),
        _probability("prob-fewshot-neutral", "as prob-fewshot with the word 'neutral'",
                     _prob_fewshot(_examples(NEUTRAL), NEUTRAL)),
        _probability("prob-fewshot6", "P(label) after a 6-example raw prompt (calm bad news, sarcasm), calibrated",
                     _prob_fewshot(_more_examples("factual"), "factual"), "factual"),
        _probability("prob-raw", "P(label) after the raw zero-shot 'The mood of this chat is', calibrated",
                     _prob_raw),
        _probability("prob-chat", "P(label) in a zero-shot chat-template answer, calibrated", _prob_chat),
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


def shipped_prior(model: str, method_name: str) -> Distribution | None:
    """The content-free label distribution measured for ``model`` and a probability method, if shipped.

    It depends only on the model and the prompt, never on a room, so it is
    measured once offline rather than paid for by the agent: its paid request
    stays one per tick.
    """
    prior = CONTENT_FREE_PRIORS.get(model, {}).get(method_name)
    return dict(prior) if prior else None


def shipped_affine(model: str, method_name: str) -> Affine | None:
    """The ``Affine`` calibration fitted for ``model`` and a probability method on the tuning half, if shipped."""
    fitted = FITTED.get(model, {}).get(method_name)
    return Affine(LABELS, *fitted) if fitted is not None else None


def shipped_calibration(model: str, method_name: str) -> Calibration:
    """How the agent calibrates ``method_name`` on ``model``: the fitted map, else the content-free prior, else None."""
    return shipped_affine(model, method_name) or shipped_prior(model, method_name)


def sample_path() -> str:
    """Where the shipped chat sample for demos lives (``llamas world replay`` plays it)."""
    return str(resources.files("agent").joinpath("data/chat_sample.jsonl"))
