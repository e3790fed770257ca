"""Plain functions over llama-cpp-python: load, format, count, constrain, generate.

Nothing here knows about Celery or Redis, so the herder (vocab-only load, for
quotes) and the worker (full load, for generation) share exactly the same
formatting and token counting.
"""

from __future__ import annotations

import codecs
import contextlib
import json
import os
import secrets
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import llama_cpp
from llama_cpp import Llama, LlamaGrammar
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import json_schema_to_gbnf

from llama_tasks.errors import BadGrammar, ContextOverflow
from llama_tasks.job import Job
from llama_tasks.placement import Placement
from llama_tasks.registry import ModelSpec


def load(spec: ModelSpec, placement: Placement, n_ctx: int) -> Llama:
    """Load ``spec`` for generation, placed as ``placement`` says."""
    return Llama(
        model_path=spec.path,
        n_ctx=n_ctx,
        n_threads=placement.n_threads,
        n_threads_batch=placement.n_threads,
        n_gpu_layers=placement.n_gpu_layers,
        verbose=False,
    )


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


def prompt_tokens(llm: Llama, job: Job) -> list[int]:
    """Tokens of the rendered prompt, as the worker will feed them."""
    text, _ = render(llm, job)
    # A chat template writes its own special tokens (BOS included); a raw
    # prompt gets the model's default BOS handling.
    return llm.tokenize(text.encode("utf-8"), add_bos=not job.is_chat, special=True)


def count_completion(llm: Llama, text: str) -> int:
    """Tokens in a completion text: how the herder recounts what it charges for."""
    return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def check_fits(n_prompt: int, max_tokens: int, n_ctx: int) -> None:
    if n_prompt + max_tokens > n_ctx:
        raise ContextOverflow(n_prompt, max_tokens, n_ctx)


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


@dataclass
class Generation:
    """What one generation produced, with its timings."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or stop string) or "length"
    prompt_s: float  # until the first token was sampled (prompt processing)
    generation_s: float  # from the first token to the end

    @property
    def tokens_per_s(self) -> float:
        return self.completion_tokens / self.generation_s if self.generation_s > 0 else 0.0


def _earliest_stop(text: str, stops: list[str], start: int) -> int:
    """Index of the first stop string in ``text`` at or after ``start``, or -1."""
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return min(hits) if hits else -1


def generate(
    llm: Llama,
    job: Job,
    tokens: list[int],
    stops: list[str],
    grammar: LlamaGrammar | None,
    on_text: Callable[[str], None],
) -> Generation:
    """Generate up to ``job.max_tokens`` after ``tokens``, streaming text to ``on_text``.

    Stops at end of sequence, at the first stop string (which is cut off, as
    in OpenAI's API), or at max tokens. Text is handed to ``on_text`` only once
    it can no longer turn out to be the start of a stop string, so the streamed
    pieces always join up to exactly the returned text.
    """
    # The seed lives on the Llama object shared by every job of this process,
    # and the sampler chain ``llm.generate`` builds reads it: set it for every
    # job, so one requester's seed never decides (or reveals) another's
    # sampling. A job that asks for no seed gets one nobody can predict;
    # 0xFFFFFFFF is excluded because llama.cpp reads it as "choose one yourself".
    llm.set_seed(job.seed if job.seed is not None else secrets.randbelow(llama_cpp.LLAMA_DEFAULT_SEED))
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    hold_back = max((len(s) for s in stops), default=1) - 1
    text, emitted, completion, finish = "", 0, 0, "length"
    started = time.perf_counter()
    first_token_at: float | None = None
    history = list(tokens)
    for token in llm.generate(
        tokens,
        temp=job.temperature,
        top_p=job.top_p,
        top_k=job.top_k,
        min_p=job.min_p,
        repeat_penalty=job.repeat_penalty,
        grammar=grammar,
        reset=True,
    ):
        if first_token_at is None:
            first_token_at = time.perf_counter()
        if llama_cpp.llama_token_is_eog(llm._model.vocab, token):
            finish = "stop"
            break
        completion += 1
        history.append(token)
        text += decoder.decode(llm.detokenize([token], prev_tokens=history[:-1]))
        cut = _earliest_stop(text, stops, max(0, emitted - hold_back))
        if cut >= 0:
            text, finish = text[:cut], "stop"
            break
        safe = len(text) - hold_back
        if safe > emitted:
            on_text(text[emitted:safe])
            emitted = safe
        if completion >= job.max_tokens:
            break
    if finish == "length":
        # Bytes of a character the token limit cut in half.
        text += decoder.decode(b"", final=True)
    if len(text) > emitted:
        on_text(text[emitted:])
    ended = time.perf_counter()
    first = first_token_at or ended
    return Generation(
        text=text,
        prompt_tokens=len(tokens),
        completion_tokens=completion,
        finish_reason=finish,
        prompt_s=first - started,
        generation_s=ended - first,
    )
