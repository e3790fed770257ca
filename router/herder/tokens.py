"""Token counting for quotes and settlement, with the models' own tokenizers.

Each model is loaded vocab-only (no weights: milliseconds and a few MB) once
per process, and prompts are formatted and tokenized by the same functions
the workers use, so a quote counts exactly the tokens a worker will feed.
"""

from __future__ import annotations

import threading
from pathlib import Path

from llama_cpp import Llama

from llama_tasks import embedding, engine, registry
from llama_tasks.constants import GRAMMAR_STEP_BUDGET_S
from llama_tasks.errors import UnknownModel
from llama_tasks.grammar_probe import GrammarProbe
from llama_tasks.job import Job
from router.core.errors import UnknownModelRequested


class TokenCounter:
    """Counts prompt and completion tokens per model name."""

    def __init__(self, models_file: Path, grammar_budget_s: float = GRAMMAR_STEP_BUDGET_S) -> None:
        self._models_file = models_file
        self._grammar_budget_s = grammar_budget_s
        self._probe = GrammarProbe()  # its process starts with the first grammar
        self._vocabs: dict[str, Llama] = {}
        self._specs: dict[str, registry.ModelSpec] = {}
        self._lock = threading.Lock()  # llama.cpp tokenizers are not shared across threads safely

    def models(self) -> dict[str, registry.ModelSpec]:
        return registry.load_registry(self._models_file)

    def _vocab(self, model: str) -> Llama:
        if model not in self._vocabs:
            try:
                spec = registry.lookup(self._models_file, model)
            except UnknownModel as exc:
                raise UnknownModelRequested(model, exc.known) from None
            self._vocabs[model], self._specs[model] = engine.load_vocab(spec), spec
        return self._vocabs[model]

    def prompt_tokens(self, job: Job) -> int:
        with self._lock:
            return len(engine.prompt_tokens(self._vocab(job.model), job))

    def input_tokens(self, job: Job) -> list[int]:
        """Tokens in each input of an embedding job, as the worker will feed them."""
        with self._lock:
            return [len(t) for t in embedding.input_tokens(self._vocab(job.model), job)]

    def embedding_size(self, model: str) -> int:
        """How many dimensions ``model``'s embeddings have."""
        with self._lock:
            return embedding.size_of(self._vocab(model))

    def check_grammar(self, job: Job) -> None:
        """Raise ``BadGrammar`` unless the job's grammar or JSON schema compiles for its model,
        and ``GrammarTooCostly`` if sampling under it may cost more a token than the budget."""
        gbnf = engine.grammar_text(job)
        if gbnf is None:
            return
        with self._lock:
            engine.compile_grammar(self._vocab(job.model), gbnf)  # BadGrammar at once, in this process
        if self._grammar_budget_s > 0:
            # Priced in a process of its own: one step of a pathological grammar can spin for hours.
            self._probe.check(self._specs[job.model].path, gbnf, self._grammar_budget_s)

    def model_id(self, model: str) -> str:
        """The registry's id (the GGUF file's sha256) of ``model``: what a result must name to be settled."""
        with self._lock:
            self._vocab(model)
            return self._specs[model].model_id

    def completion_tokens(self, model: str, text: str) -> int:
        with self._lock:
            return engine.count_completion(self._vocab(model), text)
