"""Plain functions over llama-cpp-python's vocabulary: format, count, constrain.

Nothing here knows about Celery or Redis, so the herder (for quotes) and the
worker (before it hands a job to ``batching``) share exactly the same
formatting and token counting; both load the vocabulary alone.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import llama_cpp
from llama_cpp import Llama, LlamaGrammar
from llama_cpp.llama_chat_format import Jinja2ChatFormatter
from llama_cpp.llama_grammar import json_schema_to_gbnf

from llama_tasks import tool_grammar, tool_prompt, tools
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
        lines = [f"{m['role']}: {m['content']}" for m in tool_prompt.plain_messages(job)]
        return "\n".join(lines) + "\nassistant:", []
    eos = _special_text(llm, llm.token_eos())
    formatter = _chat_formatter(template, eos, _special_text(llm, llm.token_bos()))
    # Tools go through a template that knows them; any other gets them in the documented plain format.
    if tool_prompt.handles_tools(template):
        messages, tools = tool_prompt.template_messages(job)
        rendered = formatter(messages=cast(Any, messages), tools=cast(Any, tools))
    else:
        rendered = formatter(messages=cast(Any, tool_prompt.plain_messages(job)))
    return rendered.prompt, [s for s in rendered.stop or [] if s]


def encode(llm: Llama, job: Job) -> tuple[list[int], list[str]]:
    """The rendered prompt's tokens, as the worker will feed them, and the template's stop strings."""
    text, stops = render(llm, job)
    # A chat template writes its own special tokens (BOS included); a raw
    # prompt gets the model's default BOS handling.
    return llm.tokenize(text.encode("utf-8"), add_bos=not job.is_chat, special=True), stops


def common_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def public_tokens(llm: Llama, job: Job, tokens: list[int], shared_prefixes: Sequence[str] = ()) -> int:
    """How many leading ``tokens`` of ``job`` owe nothing to what its requester wrote.

    That is the chat template's own text before the first message (found by
    rendering the same roles around two different contents: what both share
    is the template's), the BOS of a raw prompt, or a prefix of the rendered
    prompt that the operator declared shared. Only these may be served from
    another tenant's prompt cache.
    """
    def dummy(content: str) -> Job:
        if not job.is_chat:
            return dataclasses.replace(job, prompt=content)
        # Without tools or calls: their text is the requester's, never public.
        return dataclasses.replace(job, messages=[{"role": m["role"], "content": content} for m in job.messages or []],
                                   tools=None, tool_choice=None)

    first, second = encode(llm, dummy("x"))[0], encode(llm, dummy("y"))[0]
    public = min(common_prefix(first, second), common_prefix(tokens, first))
    if shared_prefixes:
        text = render(llm, job)[0]
        for prefix in shared_prefixes:
            if prefix and text.startswith(prefix):
                declared = llm.tokenize(prefix.encode("utf-8"), add_bos=not job.is_chat, special=True)
                public = max(public, common_prefix(tokens, declared))
    return min(public, len(tokens))


def prompt_tokens(llm: Llama, job: Job) -> list[int]:
    """Tokens of the rendered prompt, as the worker will feed them."""
    return encode(llm, job)[0]


def count_completion(llm: Llama, text: str) -> int:
    """Tokens in a text as the tokenizer splits it (a generation may have made it of more, smaller ones)."""
    return len(llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))


def grammar_text(job: Job) -> str | None:
    """The GBNF the job asks for, from its offered tools, its grammar or its JSON schema.

    A tool grammar with ``tool_choice`` auto is lazy: see ``grammar_triggers``.
    """
    offered = tools.offered(job.tool_choice, job.tools)
    if offered:
        return tool_grammar.gbnf(offered, job.parallel_tool_calls)
    if job.json_schema is not None:
        try:
            return json_schema_to_gbnf(json.dumps(job.json_schema))
        except Exception as exc:  # the converter raises bare Exceptions
            raise BadGrammar(f"JSON schema: {exc}") from None
    return job.grammar


def grammar_triggers(job: Job) -> list[str]:
    """Patterns that switch the job's grammar on (none: it holds from the first token)."""
    return list(tool_grammar.TRIGGERS) if tools.choice(job.tool_choice, job.tools) == "auto" else []


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


#: Tokens the cost probe walks into a grammar.
PROBE_STEPS = 32
#: The probe times the grammar against every this-many-th token of the vocabulary (and every
#: one-character token, so it can walk on), and scales up to the whole vocabulary.
PROBE_STRIDE = 16


@dataclass(frozen=True)
class _ProbeSet:
    candidates: Any  # a ctypes array of llama_token_data, rewritten before each use
    ids: list[int]
    length: dict[int, int]  # piece length in bytes, for the candidates


_probe_sets: weakref.WeakKeyDictionary[Llama, _ProbeSet] = weakref.WeakKeyDictionary()


def prepare_probe(llm: Llama) -> None:
    """Build the candidates the probe times grammars against, once per vocabulary (a fraction of a second)."""
    if llm not in _probe_sets:
        n_vocab = llama_cpp.llama_vocab_n_tokens(llm._model.vocab)
        length = {t: len(llm._model.token_to_piece(t, special=False)) for t in range(n_vocab)}
        ids = sorted({t for t in range(0, n_vocab, PROBE_STRIDE)} | {t for t, n in length.items() if n == 1})
        _probe_sets[llm] = _ProbeSet((llama_cpp.llama_token_data * len(ids))(), ids, {t: length[t] for t in ids})


def _timed_apply(sampler: Any, probe: _ProbeSet) -> float:
    """Seconds the grammar takes to judge every probe candidate; leaves its verdicts in ``probe``."""
    for i, token in enumerate(probe.ids):
        probe.candidates[i].id, probe.candidates[i].logit, probe.candidates[i].p = token, 0.0, 0.0
    array = llama_cpp.llama_token_data_array(probe.candidates, len(probe.ids), -1, False)
    # CPU time of this thread: on a busy machine, time spent waiting for a core is not the grammar's.
    started = time.thread_time()
    llama_cpp.llama_sampler_apply(sampler, ctypes.byref(array))
    return time.thread_time() - started


def grammar_step_cost(llm: Llama, grammar: LlamaGrammar, budget_s: float,
                      on_step: Callable[[float], None] | None = None) -> float:
    """The dearest step of sampling under ``grammar`` seen on a walk into it, in seconds.

    llama.cpp checks every vocabulary token against every parse stack of the
    grammar at every step, and ambiguous nested repetitions (``(("a"{0,30}){0,30}){0,30}``)
    multiply the stacks until one step takes minutes inside C code that
    nothing can interrupt. So before a grammar is admitted the probe walks
    ``PROBE_STEPS`` tokens into it — each time the shortest piece the grammar
    allows, which visits the most positions — timing each step against a
    sample of the vocabulary, scaled to the whole. It stops as soon as a step
    costs more than ``budget_s``; one step that never ends is
    ``grammar_probe``'s to cut off (it runs this in a process it can kill),
    and any walk the probe did not take, the worker's watchdog answers for.
    """
    prepare_probe(llm)
    probe = _probe_sets[llm]
    vocab = llm._model.vocab
    n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
    scale = n_vocab / len(probe.ids)
    sampler = llama_cpp.llama_sampler_init_grammar(vocab, grammar._grammar.encode("utf-8"), grammar._root.encode("utf-8"))
    if not sampler:
        raise BadGrammar("llama.cpp could not parse the grammar")
    worst = 0.0
    try:
        for _ in range(PROBE_STEPS):
            # The cheaper of two timings: caches and page faults only ever add time.
            cost = min(_timed_apply(sampler, probe) for _ in range(2)) * scale
            allowed = [probe.candidates[i].id for i in range(len(probe.ids))
                       if probe.candidates[i].logit != -math.inf
                       and not llama_cpp.llama_vocab_is_eog(vocab, probe.candidates[i].id)]
            if not allowed:
                return max(worst, cost)  # the grammar is done (or needs a token the sample lacks)
            token = min(allowed, key=lambda t: (probe.length[t], t))
            started = time.thread_time()
            llama_cpp.llama_sampler_accept(sampler, token)
            worst = max(worst, cost + time.thread_time() - started)
            if on_step is not None:
                on_step(worst)
            if worst > budget_s:
                break
    finally:
        llama_cpp.llama_sampler_free(sampler)
    return worst


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
