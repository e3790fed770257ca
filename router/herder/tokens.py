"""Token counting for quotes and settlement, with the models' own tokenizers.

Each model is loaded vocab-only (no weights: milliseconds and a few MB) once
per process, and prompts are formatted and tokenized by the same functions
the workers use, so a quote counts exactly the tokens a worker will feed.
"""

from __future__ import annotations

import threading
from pathlib import Path

from llama_cpp import Llama

from llama_tasks import engine, registry
from llama_tasks.errors import UnknownModel
from llama_tasks.job import Job
from router.core.errors import UnknownModelRequested


class TokenCounter:
    """Counts prompt and completion tokens per model name."""

    def __init__(self, models_file: Path) -> None:
        self._models_file = models_file
        self._vocabs: dict[str, Llama] = {}
        self._lock = threading.Lock()  # llama.cpp tokenizers are not shared across threads safely

    def models(self) -> dict[str, registry.ModelSpec]:
        return registry.load_registry(self._models_file)

    def _vocab(self, model: str) -> Llama:
        if model not in self._vocabs:
            try:
                spec = registry.lookup(self._models_file, model)
            except UnknownModel as exc:
                raise UnknownModelRequested(model, exc.known) from None
            self._vocabs[model] = engine.load_vocab(spec)
        return self._vocabs[model]

    def prompt_tokens(self, job: Job) -> int:
        with self._lock:
            return len(engine.prompt_tokens(self._vocab(job.model), job))

    def check_grammar(self, job: Job) -> None:
        """Raise ``BadGrammar`` unless the job's grammar or JSON schema compiles for its model."""
        gbnf = engine.grammar_text(job)
        if gbnf is None:
            return
        with self._lock:
            engine.compile_grammar(self._vocab(job.model), gbnf)

    def completion_tokens(self, model: str, text: str) -> int:
        with self._lock:
            return engine.count_completion(self._vocab(model), text)
