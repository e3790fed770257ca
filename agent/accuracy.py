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
from llama_tasks import engine, registry
from llama_tasks.job import Job
from llama_tasks.placement import place
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


def load_model(models_file: Path, model: str) -> Llama:
    """Load ``model`` from the registry once, on the CPU with every core."""
    spec = registry.lookup(models_file, model)
    registry.verify(spec)
    return engine.load(spec, place(0, [], 1, cpu_count()), N_CTX)


def generate(llm: Llama, request: GradingRequest, model: str) -> str:
    """The text a worker would return for ``request``."""
    job = Job(job_id="accuracy", attempt=1, model=model, max_tokens=request.max_tokens, expires_at=0.0,
              issued_at=0.0, prompt=request.prompt, messages=request.messages, grammar=request.grammar,
              temperature=0.0)
    tokens = engine.prompt_tokens(llm, job)
    engine.check_fits(len(tokens), job.max_tokens, llm.n_ctx())
    _, template_stops = engine.render(llm, job)
    grammar = engine.compile_grammar(llm, request.grammar)
    return engine.generate(llm, job, tokens, template_stops, grammar, lambda _: None).text


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
