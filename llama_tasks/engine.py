"""Plain functions over llama-cpp-python's vocabulary: format, count, constrain.

Nothing here knows about Celery or Redis, so the herder (for quotes) and the
worker (before it hands a job to ``batching``) share exactly the same
formatting and token counting; both load the vocabulary alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from functools import lru_cache
from typing import Any, cast

import llama_cpp
from llama_cpp import Llama, LlamaGrammar
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import json_schema_to_gbnf

from llama_tasks.errors import BadGrammar
from llama_tasks.job import Job
from llama_tasks.registry import ModelSpec


def load_vocab(spec: ModelSpec) -> Llama:
    """Load only the tokenizer and metadata of ``spec``: enough to count tokens."""
    return Llama(model_path=spec.path, vocab_only=True, verbose=False)


@lru_cache(maxsize=16)
def _chat_formatter(template: str, eos: str, bos: str) -> Jinja2ChatFormatter:
    return Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos)


def _special_text(llm: Llama, token: int) -> str:
    return llm._model.token_get_text(token) if token != -1 else ""


def render(llm: Llama, job: Job) -> tuple[str, list[str]]:
    """The exact prompt text the model sees, and stop strings the template adds.

    Chat messages go through the model's own chat template from its GGUF
    metadata; a raw prompt is used as is.
    """
    if not job.is_chat:
        assert job.prompt is not None
        return job.prompt, []
    template = llm.metadata.get("tokenizer.chat_template")
    if not template:
        # A model without a template gets a plain transcript; documented in the README.
        lines = [f"{m['role']}: {m['content']}" for m in job.messages or []]
        return "\n".join(lines) + "\nassistant:", []
    eos = _special_text(llm, llm.token_eos())
    formatter = _chat_formatter(template, eos, _special_text(llm, llm.token_bos()))
    rendered = formatter(messages=cast(Any, job.messages or []))
    return rendered.prompt, [s for s in rendered.stop or [] if s]


def encode(llm: Llama, job: Job) -> tuple[list[int], list[str]]:
    """The rendered prompt's tokens, as the worker will feed them, and the template's stop strings."""
    text, stops = render(llm, job)
    # A chat template writes its own special tokens (BOS included); a raw
    # prompt gets the model's default BOS handling.
    return llm.tokenize(text.encode("utf-8"), add_bos=not job.is_chat, special=True), stops


def prompt_tokens(llm: Llama, job: Job) -> list[int]:
    """Tokens of the rendered prompt, as the worker will feed them."""
    return encode(llm, job)[0]


def count_completion(llm: Llama, text: str) -> int:
    """Tokens in a completion text: how the herder recounts what it charges for."""
    return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def grammar_text(job: Job) -> str | None:
    """The GBNF the job asks for, from its grammar or its JSON schema."""
    if job.json_schema is not None:
        try:
            return json_schema_to_gbnf(json.dumps(job.json_schema))
        except Exception as exc:  # the converter raises bare Exceptions
            raise BadGrammar(f"JSON schema: {exc}") from None
    return job.grammar


def compile_grammar(llm: Llama, gbnf: str) -> LlamaGrammar:
    """Parse ``gbnf`` against this model's vocabulary, or raise ``BadGrammar``.

    llama-cpp-python defers parsing to sampling time and would hand a NULL
    sampler to the chain on a bad grammar (a crash), so we parse it once here
    and free the probe.
    """
    grammar = LlamaGrammar.from_string(gbnf, verbose=False)
    with _stderr_without(grammar._grammar):
        probe = llama_cpp.llama_sampler_init_grammar(
            llm._model.vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8")
        )
    if not probe:
        first_line = gbnf.strip().splitlines()[0] if gbnf.strip() else "(empty)"
        raise BadGrammar(f"llama.cpp could not parse the grammar starting {first_line[:80]!r}")
    llama_cpp.llama_sampler_free(probe)
    return grammar


@contextlib.contextmanager
def _stderr_without(secret: str) -> Iterator[None]:
    """Pass through what C code writes to stderr meanwhile, minus ``secret``.

    llama.cpp prints a grammar that fails to parse, whole, straight to file
    descriptor 2 (not through its log callback); a grammar is requester text
    and must not reach an operator's log. Writes go to a temporary file (a
    pipe could fill and block) and are copied back with the grammar cut out,
    so nothing another thread wrote in between is lost.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode("utf-8", "replace")
            if text:
                cleaned = text.replace(secret, "(grammar withheld)") if secret else text
                sys.stderr.write(cleaned)
                sys.stderr.flush()
