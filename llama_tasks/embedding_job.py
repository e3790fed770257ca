"""The embedding job kind as the client, the herder and the worker agree on it: its checks and its vectors.

An embedding job is a ``Job`` whose ``input`` is set: a list of texts or
token arrays, each turned into one vector by the model the worker holds
(``llama_tasks.embedding`` tokenizes and embeds them). Nothing here loads
llama.cpp, so the client checks a request before sending it.

Vectors travel as base64 of little-endian float32 (OpenAI's
``encoding_format: base64``): exact, a third the size of JSON floats, and a
plain string inside the signed result document (a float's text form is not
something two JSON libraries agree on byte for byte). Every vector has unit
L2 norm, as OpenAI's have.
"""

from __future__ import annotations

import base64
import binascii
import struct
from typing import TYPE_CHECKING

from llama_tasks.errors import BadInput, EmptyInput, InputTooLong, InvalidRequest

if TYPE_CHECKING:  # type hints only: ``job`` calls ``validate``
    from llama_tasks.job import Generation

#: Most inputs one request may carry (OpenAI's limit).
MAX_INPUTS = 2048
#: Largest token id a token array may hold before the model's vocabulary is known (llama.cpp's are int32).
MAX_TOKEN_ID = 2**31 - 1
#: Longest vector a result may carry, in base64 characters: 65,536 dimensions.
MAX_VECTOR_CHARS = 4 * 65_536 * 4 // 3 + 4
#: Generation fields an embedding job must leave at their defaults.
_GENERATION_ONLY: dict[str, object] = {
    "prompt": None, "messages": None, "grammar": None, "json_schema": None, "n": 1, "logprobs": False,
    "top_logprobs": 0, "tools": None, "tool_choice": None, "parallel_tool_calls": True,
}


def as_inputs(value: object) -> list[object]:
    """OpenAI's four shapes of ``input`` (a string, a list of strings, a token array, a list of token
    arrays) as one list of texts or token arrays; what each holds is ``validate``'s to check."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        return [value]  # one token array
    if isinstance(value, list):
        return value
    if value is None:
        raise BadInput("input", "is required")
    raise BadInput("input", "must be a string, a list of strings, a token array or a list of token arrays")


def _is_token(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_TOKEN_ID


def _check_text(name: str, text: str) -> None:
    if not text:
        raise EmptyInput(name)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise BadInput(name, "is not valid Unicode text (it contains a lone surrogate)") from None


def validate(job: Generation) -> None:
    """Raise the typed error for the first thing wrong with an embedding job (no vocabulary needed)."""
    if job.input is None:
        raise BadInput("dimensions", "only embedding requests (with input) take dimensions")
    for name, default in _GENERATION_ONLY.items():
        value = getattr(job, name)
        if type(value) is not type(default) or value != default:
            raise InvalidRequest(f"{name} is not taken by an embedding request (it embeds input)")
    if job.stop:
        raise InvalidRequest("stop is not taken by an embedding request (it embeds input)")
    inputs = job.input
    if not isinstance(inputs, list):
        raise BadInput("input", "must be a string, a list of strings, a token array or a list of token arrays")
    if not inputs:
        raise EmptyInput("input")
    if len(inputs) > MAX_INPUTS:
        raise BadInput("input", f"at most {MAX_INPUTS} inputs per request, got {len(inputs)}")
    for i, item in enumerate(inputs):
        name = f"input[{i}]"
        if isinstance(item, str):
            _check_text(name, item)
        elif isinstance(item, list):
            if not item:
                raise EmptyInput(name)
            if not all(_is_token(t) for t in item):
                raise BadInput(name, "a token array holds token ids: integers from 0")
        else:
            raise BadInput(name, "must be a string or a token array")
    dims = job.dimensions
    if dims is not None and (isinstance(dims, bool) or not isinstance(dims, int) or dims < 1):
        raise BadInput("dimensions", f"must be a positive integer, got {dims!r}")


def check_lengths(lengths: list[int], n_ctx: int) -> None:
    """Refuse an input longer than the model's context, naming it and both numbers."""
    for i, n in enumerate(lengths):
        if n > n_ctx:
            raise InputTooLong(f"input[{i}]", n, n_ctx)


def _raw(text: object) -> bytes | None:
    if not isinstance(text, str) or not 0 < len(text) <= MAX_VECTOR_CHARS:
        return None
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return None
    return raw if raw and len(raw) % 4 == 0 else None


def dimensions_of(text: object) -> int:
    """How many float32 values ``text`` (a vector as base64) holds; 0 if it is not such a vector."""
    raw = _raw(text)
    return 0 if raw is None else len(raw) // 4


def decode_vector(text: str) -> list[float]:
    """The floats of a vector sent as base64 of little-endian float32; ``ValueError`` if it is not one."""
    raw = _raw(text)
    if raw is None:
        raise ValueError("not a vector of float32 in base64")
    return list(struct.unpack(f"<{len(raw) // 4}f", raw))


def encode_floats(values: list[float]) -> str:
    """Floats as base64 of little-endian float32 (how ``decode_vector`` reads them)."""
    return base64.b64encode(struct.pack(f"<{len(values)}f", *values)).decode("ascii")
