"""Embedding jobs on the worker's model: their tokens, their pooling, their vectors and their result.

The herder (to quote) and the worker (to embed) tokenize inputs with the
same function here, so the tokens charged are the tokens fed. The checks
and the vectors' wire form are ``llama_tasks.embedding_job``'s; the engine
side is ``llama_tasks.embedder``.

Pooling: a model's GGUF may declare how its token states become one vector
(``<arch>.pooling_type``: mean, CLS, last), and is embedded that way; a
generative model such as the bundled SmolLM2 declares none, and gets the
mean of its last hidden states over the input's tokens (what llama.cpp's
own ``--pooling mean`` gives).
"""

from __future__ import annotations

import base64
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llama_cpp
import numpy as np
from llama_cpp import Llama

from llama_tasks.embedding_job import check_lengths
from llama_tasks.errors import BadInput, EmptyInput
from llama_tasks.job import Generation, Job
from llama_tasks.result import Choice, Result

if TYPE_CHECKING:  # the engine imports this module (through ``embedder``)
    from llama_tasks.batching import BatchEngine

#: llama.cpp's pooling types by name, for logs and documents.
POOLING_NAMES = {
    llama_cpp.LLAMA_POOLING_TYPE_NONE: "none",
    llama_cpp.LLAMA_POOLING_TYPE_MEAN: "mean",
    llama_cpp.LLAMA_POOLING_TYPE_CLS: "cls",
    llama_cpp.LLAMA_POOLING_TYPE_LAST: "last",
    llama_cpp.LLAMA_POOLING_TYPE_RANK: "rank",
}


def pooling_for(declared: int) -> int:
    """The pooling a model is embedded with, from what its GGUF declares.

    ``none`` (a generative model) and ``rank`` (a reranker's score head, not a
    vector) become ``mean``; ``mean``, ``cls`` and ``last`` are used as declared.
    """
    if declared in (llama_cpp.LLAMA_POOLING_TYPE_MEAN, llama_cpp.LLAMA_POOLING_TYPE_CLS,
                    llama_cpp.LLAMA_POOLING_TYPE_LAST):
        return declared
    return llama_cpp.LLAMA_POOLING_TYPE_MEAN


def input_tokens(vocab: Llama, job: Generation) -> list[list[int]]:
    """Each input's tokens as the worker feeds them; ``BadInput`` for a token the vocabulary lacks.

    Texts get the model's default BOS handling and no special-token parsing
    (llama-cpp-python's ``Llama.embed`` does the same); token arrays are fed as given.
    """
    assert job.input is not None
    n_vocab = vocab.n_vocab()
    out = []
    for i, item in enumerate(job.input):
        if isinstance(item, str):
            tokens = vocab.tokenize(item.encode("utf-8"), add_bos=True, special=False)
        else:
            tokens = list(item)
            bad = next((t for t in tokens if not 0 <= t < n_vocab), None)
            if bad is not None:
                raise BadInput(f"input[{i}]", f"token {bad} is not in the model's vocabulary of {n_vocab} tokens")
        if not tokens:
            raise EmptyInput(f"input[{i}]")
        out.append(tokens)
    return out


def size_of(vocab: Llama) -> int:
    """How many dimensions the model's embeddings have, from its GGUF metadata.

    Read from the metadata (``<arch>.embedding_length_out``, else
    ``<arch>.embedding_length``, as llama.cpp reads them) because a
    vocabulary-only load, the herder's, leaves llama.cpp's own figure at 0.
    """
    meta = vocab.metadata
    arch = meta.get("general.architecture", "")
    value = meta.get(f"{arch}.embedding_length_out") or meta.get(f"{arch}.embedding_length") or "0"
    try:
        return int(value)
    except ValueError:
        return 0


def normalized(vector: np.ndarray) -> np.ndarray:
    """``vector`` scaled to unit L2 norm (summed in float64), as float32; a zero vector stays zero."""
    v = np.asarray(vector, dtype=np.float64)
    norm = float(np.sqrt(np.dot(v, v)))
    return (v / norm if norm > 0 else v).astype(np.float32)


def encode_vector(vector: np.ndarray) -> str:
    """A vector as base64 of little-endian float32 (OpenAI's ``encoding_format: base64``)."""
    return base64.b64encode(np.asarray(vector, dtype="<f4").tobytes()).decode("ascii")


@dataclass
class Embedded:
    """Every vector of one embedding job, in input order, with what it cost the worker."""

    vectors: list[np.ndarray]
    prompt_tokens: int
    queue_s: float
    embed_s: float

    #: An embedding job always ends this way: there is nothing to cut short.
    finish_reason = "stop"

    def result(self, *, task_id: str, job_id: str, attempt: int, model: str, model_id: str, worker: str,
               load_count: int, queue_wait_s: float) -> Result:
        """The attempt's ``Result``: one choice per input, its vector in ``embedding``."""
        return Result(
            task_id=task_id, job_id=job_id, attempt=attempt, model=model, model_id=model_id,
            choices=tuple(Choice(index=i, text="", finish_reason=self.finish_reason, embedding=encode_vector(v))
                          for i, v in enumerate(self.vectors)),
            prompt_tokens=self.prompt_tokens,
            worker=worker, pid=os.getpid(), load_count=load_count,
            # A generation's timings, so every reader of them finds its keys: the inputs are the prompt,
            # and nothing is generated (``tokens_per_s`` is generation's speed; the inputs' is its own key).
            timings={"queue_wait_s": queue_wait_s, "engine_queue_s": self.queue_s, "prompt_s": self.embed_s,
                     "generation_s": 0.0, "tokens_per_s": 0.0,
                     "embed_tokens_per_s": self.prompt_tokens / self.embed_s if self.embed_s > 0 else 0.0},
        )


def run(batch: BatchEngine, vocab: Llama, job: Job) -> Embedded:
    """Embed every input of ``job`` on ``batch`` and wait for all of them."""
    tokens = input_tokens(vocab, job)
    check_lengths([len(t) for t in tokens], batch.n_ctx_per_slot)
    ticket = batch.embed(tokens)
    vectors = ticket.result()
    return Embedded(vectors=vectors, prompt_tokens=sum(len(t) for t in tokens), queue_s=ticket.queue_s,
                    embed_s=ticket.embed_s)
