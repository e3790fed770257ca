"""How well a grading method grades labelled rooms, with the real model in process.

It generates exactly as a worker would (``llama_tasks.engine``: the same
prompt rendering, grammar, greedy sampling and log probabilities the herder
would dispatch and forward), and reads the answer with the agent's own
``Method.read``, so the figure it reports is the agent's accuracy through
the service. A buy decision is right when the agent would buy (grade above
3) exactly for the positive rooms.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llama_cpp import Llama

from agent import fitting, scoring
from agent.errors import UnparseableAnswer
from agent.grading import GradingRequest, Method, Reading, transcript
from agent.rooms import LABELS, LabelledRoom
from agent.scoring import POSITIVE, Affine, Calibration, Distribution, whole_grade
from agent.strategy import BUY_ABOVE
from llama_tasks import engine, generation, registry
from llama_tasks.batching import BatchEngine
from llama_tasks.job import Job
from llama_tasks.settings import cpu_count

#: Context window of the in-process model: the workers' default.
N_CTX = 2048
#: What an answer that no grade can be read from counts as.
UNREADABLE = "unreadable"


@dataclass
class Report:
    """Accuracy of one method on a labelled sample."""

    method: str
    total: int = 0
    correct: int = 0
    #: Rooms whose buy-or-not decision (positive or not) was right.
    decisions: int = 0
    per_label: Counter[str] = field(default_factory=Counter)  # correct rooms per true label
    label_totals: Counter[str] = field(default_factory=Counter)
    answers: Counter[str] = field(default_factory=Counter)  # predicted labels
    #: (true label, predicted label) → rooms.
    confusion: Counter[tuple[str, str]] = field(default_factory=Counter)
    wrong: list[str] = field(default_factory=list)  # "room: true → predicted"

    def add(self, room: LabelledRoom, predicted: str, buys: bool) -> None:
        self.total += 1
        self.label_totals[room.label] += 1
        self.answers[predicted] += 1
        self.confusion[room.label, predicted] += 1
        if predicted == room.label:
            self.correct += 1
            self.per_label[room.label] += 1
        else:
            self.wrong.append(f"{room.room}: {room.label} → {predicted}")
        if buys == (room.label == POSITIVE):
            self.decisions += 1

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> str:
        per = ", ".join(f"{lab} {self.per_label[lab]}/{self.label_totals[lab]}" for lab in LABELS)
        return (f"{self.method}: {self.correct}/{self.total} = {self.accuracy:.0%} ({per}); "
                f"buy decisions right {self.decisions}/{self.total}")

    def matrix(self) -> list[str]:
        """The confusion matrix as text lines: a row per true label, a column per predicted one."""
        columns = list(LABELS) + ([UNREADABLE] if self.answers[UNREADABLE] else [])
        lines = ["true \\ predicted  " + "".join(f"{c:>11}" for c in columns)]
        for label in LABELS:
            lines.append(f"{label:18}" + "".join(f"{self.confusion[label, c]:>11}" for c in columns))
        return lines


@dataclass
class LocalModel:
    """A model loaded in this process the way a worker holds it: vocabulary and batch engine."""

    name: str
    vocab: Llama
    engine: BatchEngine

    def close(self) -> None:
        self.engine.stop()


def load_model(models_file: Path, model: str) -> LocalModel:
    """Load ``model`` from the registry once, on the CPU with every core."""
    spec = registry.lookup(models_file, model)
    registry.verify(spec)
    batch = BatchEngine.load(spec.path, slots=1, n_ctx_per_slot=N_CTX, n_threads=cpu_count(), n_gpu_layers=0)
    return LocalModel(spec.name, engine.load_vocab(spec), batch.start())


def generate(local: LocalModel, request: GradingRequest) -> dict[str, Any]:
    """The response a requester would receive for ``request``: ``text`` and ``choices`` with logprobs."""
    job = Job(job_id="accuracy", attempt=1, model=local.name, max_tokens=request.max_tokens, expires_at=0.0,
              issued_at=0.0, prompt=request.prompt, messages=request.messages, grammar=request.grammar,
              temperature=0.0, logprobs=request.top_logprobs > 0, top_logprobs=request.top_logprobs)
    return response_of(generation.run(local.engine, generation.sequences(local.vocab, job, None)))


def response_of(generated: generation.JobResult) -> dict[str, Any]:
    """A generation in the shape the herder forwards (``status``, ``text``, ``choices``)."""
    return {"status": "done", "text": generated.first.text, "choices": [c.to_json() for c in generated.as_choices()]}


Answer = Callable[[GradingRequest], dict[str, Any]]


def measure_prior(method: Method, answer: Answer) -> Distribution | None:
    """``method``'s content-free label distribution (None for a word method)."""
    if not method.scores_probabilities:
        return None
    return scoring.content_free_prior([method.distribution(answer(r)) for r in method.content_free_requests()])


def samples(method: Method, rooms: Sequence[LabelledRoom], answer: Answer) -> list[tuple[Distribution, str]]:
    """Each room's uncalibrated label distribution under ``method``, with its true label: what a map is fitted on."""
    return [(method.distribution(answer(method.build(room.messages))), room.label) for room in rooms]


def refit(method: Method, tune: Sequence[LabelledRoom], answer: Answer) -> tuple[Affine, dict[str, Affine]]:
    """An ``Affine`` calibration fitted on ``tune``, and for each of those rooms the one fitted without it,
    keyed by the room's transcript (``held_out_key``).

    Grading a tuning room with the map fitted on all of them would be
    in-sample; leave-one-out is the honest figure on the half the map came from.
    """
    labelled = samples(method, tune, answer)
    return (fitting.fit(labelled, LABELS),
            dict(zip(map(held_out_key, tune), fitting.leave_one_out(labelled, LABELS))))


def held_out_key(room: LabelledRoom) -> str:
    """What makes a room one the map was fitted on: its chat, whatever file or name it comes under."""
    return transcript(room.messages)


def evaluate(method: Method, rooms: Sequence[LabelledRoom], answer: Answer, calibration: Calibration = None,
             on_room: Callable[[LabelledRoom, str, Reading | None], None] | None = None,
             held_out_of: Mapping[str, Affine] | None = None) -> Report:
    """Grade every room with ``method`` (calibrated by ``calibration``), getting each response from ``answer``.

    A room in ``held_out_of`` is graded with its map instead: the one fitted without it.
    """
    report = Report(method.name)
    for room in rooms:
        response = answer(method.build(room.messages))
        reading: Reading | None
        own = (held_out_of or {}).get(held_out_key(room), calibration)
        try:
            reading = method.read(response, own)
        except UnparseableAnswer:
            reading = None
        predicted = reading.label if reading is not None else UNREADABLE
        report.add(room, predicted, reading is not None and whole_grade(reading.grade) > BUY_ABOVE)
        if on_room is not None:
            on_room(room, str(response.get("text") or ""), reading)
    return report
