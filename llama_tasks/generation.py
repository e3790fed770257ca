"""One job on the batch engine: its sequences in, its choices out.

Plain functions: the Celery task (``runtime``) and in-process users (the
agent's offline evaluation, tests) run a ``Job`` the same way.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from llama_cpp import Llama

from llama_tasks import engine
from llama_tasks.batching import BatchEngine, OnText, SequenceResult, SequenceSpec, Ticket
from llama_tasks.job import MAX_SEED, Job
from llama_tasks.result import Choice, Result

#: How often a waiting job asks whether it was cancelled, in seconds.
CANCEL_POLL_S = 0.5


@dataclass
class JobResult:
    """Every choice of one job, and what they share."""

    choices: list[SequenceResult]

    @property
    def first(self) -> SequenceResult:
        return self.choices[0]

    @property
    def finish_reason(self) -> str:
        """Why the job's stream ended: its first choice's reason."""
        return self.first.finish_reason

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.choices)

    def as_choices(self) -> tuple[Choice, ...]:
        return tuple(Choice(index=i, text=c.text, finish_reason=c.finish_reason,
                            completion_tokens=c.completion_tokens, logprobs=c.logprobs)
                     for i, c in enumerate(self.choices))

    def result(self, *, task_id: str, job_id: str, attempt: int, model: str, model_id: str, worker: str,
               load_count: int, queue_wait_s: float) -> Result:
        """The attempt's ``Result``: these choices, with what identifies the attempt."""
        first = self.first
        return Result(
            task_id=task_id, job_id=job_id, attempt=attempt, model=model, model_id=model_id,
            choices=self.as_choices(),
            prompt_tokens=first.prompt_tokens,
            completion_tokens=self.completion_tokens,
            cached_tokens=min(c.cached_tokens for c in self.choices),
            worker=worker, pid=os.getpid(), load_count=load_count,
            timings={
                "queue_wait_s": queue_wait_s,
                "engine_queue_s": first.queue_s,
                "prompt_s": first.prompt_s,
                "generation_s": max(c.generation_s for c in self.choices),
                "tokens_per_s": first.tokens_per_s,
            },
        )


#: ``on_text(index, piece, logprobs)``: a final piece of choice ``index``'s text, with its tokens'
#: log probability entries (None without logprobs), as ``batching.SequenceSpec.on_text`` gives them.
OnChoiceText = Callable[[int, str, list[dict[str, Any]] | None], None]


def _for_choice(on_text: OnChoiceText | None, index: int) -> OnText | None:
    if on_text is None:
        return None

    def choice_text(piece: str, logprobs: list[dict[str, Any]] | None) -> None:
        on_text(index, piece, logprobs)

    return choice_text


def sequences(vocab: Llama, job: Job, on_text: OnChoiceText | None,
              time_limit_s: float | None = None, shared_prefixes: Sequence[str] = ()) -> list[SequenceSpec]:
    """The sequences of ``job`` (one per choice), or the typed error that refuses it.

    Every choice streams its text through ``on_text``, with its index.

    Whether they fit a slot is the engine's to say, when they are submitted.
    """
    tokens, template_stops = engine.encode(vocab, job)  # rendered once
    public = engine.public_tokens(vocab, job, tokens, shared_prefixes)
    gbnf = engine.grammar_text(job)
    grammar = engine.compile_grammar(vocab, gbnf) if gbnf else None
    # Every job samples from its own seed: one requester's never decides (or
    # reveals) another's (the herder draws one for every job; this is for callers that do not).
    seed = job.seed if job.seed is not None else secrets.randbelow(MAX_SEED + 1)
    top = job.top_logprobs if job.logprobs else None
    return [
        SequenceSpec(
            tokens=tokens,
            max_tokens=job.max_tokens,
            stops=job.stop + template_stops,
            temperature=job.temperature,
            top_p=job.top_p,
            top_k=job.top_k,
            min_p=job.min_p,
            repeat_penalty=job.repeat_penalty,
            # Choices differ by seed; choice 0 uses the job's, so n=1 is unchanged.
            seed=(seed + i) % (MAX_SEED + 1),
            grammar=grammar,
            grammar_triggers=engine.grammar_triggers(job),
            top_logprobs=top,
            on_text=_for_choice(on_text, i),
            time_limit_s=time_limit_s,
            cache_key=job.cache_key,
            public_tokens=public,
        )
        for i in range(job.n)
    ]


def run(batch: BatchEngine, specs: list[SequenceSpec], cancelled: Callable[[], bool] | None = None) -> JobResult:
    """Submit ``specs`` together and wait for all; ``cancelled()`` is asked while waiting."""
    tickets: list[Ticket] = []
    try:
        for spec in specs:
            tickets.append(batch.submit(spec))
        for ticket in tickets:
            while not ticket.done():
                if cancelled is not None and cancelled():
                    for t in tickets:
                        t.cancel()
                    cancelled = None
                ticket.wait(CANCEL_POLL_S)
        return JobResult([t.result() for t in tickets])
    finally:
        # Whatever went wrong here (a Redis error while polling), no slot stays taken.
        for t in tickets:
            if not t.done():
                t.cancel()
