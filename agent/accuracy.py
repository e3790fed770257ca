"""How well a grading method grades the labelled sample, with the real model in process.

It generates exactly as a worker would (``llama_tasks.engine``: the same
prompt rendering, grammar and greedy sampling the herder would dispatch), so
the figure it reports is the agent's accuracy through the service.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from llama_cpp import Llama

from agent.errors import UnparseableAnswer
from agent.grading import LABELS, POSITIVE, GradingRequest, LabelledRoom, Method, label_of_grade
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
    wrong: list[str] = field(default_factory=list)  # "room: true → predicted"

    def add(self, room: LabelledRoom, predicted: str) -> None:
        self.total += 1
        self.label_totals[room.label] += 1
        self.answers[predicted] += 1
        if predicted == room.label:
            self.correct += 1
            self.per_label[room.label] += 1
        else:
            self.wrong.append(f"{room.room}: {room.label} → {predicted}")
        if (predicted == POSITIVE) == (room.label == POSITIVE):
            self.decisions += 1

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    def summary(self) -> str:
        per = ", ".join(f"{lab} {self.per_label[lab]}/{self.label_totals[lab]}" for lab in LABELS)
        return (f"{self.method}: {self.correct}/{self.total} = {self.accuracy:.0%} ({per}); "
                f"buy decisions right {self.decisions}/{self.total}")


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


def generate(local: LocalModel, request: GradingRequest) -> str:
    """The text a worker would return for ``request``."""
    job = Job(job_id="accuracy", attempt=1, model=local.name, max_tokens=request.max_tokens, expires_at=0.0,
              issued_at=0.0, prompt=request.prompt, messages=request.messages, grammar=request.grammar,
              temperature=0.0)
    return generation.run(local.engine, generation.sequences(local.vocab, job, None)).first.text


def evaluate(method: Method, rooms: Sequence[LabelledRoom], answer: Callable[[GradingRequest], str],
             on_room: Callable[[LabelledRoom, str, str], None] | None = None) -> Report:
    """Grade every room with ``method``, getting each answer from ``answer``."""
    report = Report(method.name)
    for room in rooms:
        text = answer(method.build(room.messages))
        try:
            predicted = label_of_grade(method.grade(text))
        except UnparseableAnswer:
            predicted = UNREADABLE
        report.add(room, predicted)
        if on_room is not None:
            on_room(room, text, predicted)
    return report
