"""OpenAI's ``POST /v1/embeddings``: a paid embedding job, answered in OpenAI's shape.

``input`` is a string, a list of strings, a token array or a list of token
arrays; ``encoding_format`` is ``float`` (the default) or ``base64``
(little-endian float32, as OpenAI's); ``dimensions`` is accepted only at the
model's own size (``router.core.admission`` says why); ``user`` is accepted
and not used. The bid and the other llamas extras are the chat endpoint's.
Everything else is refused by name. The job goes through the one admission
path, so it is quoted, held, queued in the fee market and charged like a
completion: ``base_fee + fee_per_embedding_token × input tokens``, times the
multiplier offered.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from llama_tasks.embedding_job import as_inputs, decode_vector
from llama_tasks.errors import BadInput
from llama_tasks.registry import DEFAULT_MODEL
from router.core.errors import UnsupportedParameter
from router.core.request import Submission
from router.gateway import completions, limits, openai_request
from router.gateway.deps import AccountKey, AsyncRedis, Service, service_of

router = APIRouter()

#: Parameters the endpoint takes, by their OpenAI names (llamas extras included).
HONOURED = frozenset({"input", "model", "encoding_format", "dimensions", "user",
                      "multiplier", "fee", "reference", "deadline_s"})
ENCODINGS = ("float", "base64")


@dataclass(frozen=True)
class EmbedCall:
    """One parsed embeddings request: what to submit and how to write the vectors."""

    sub: Submission
    encoding_format: str


def submission(body: Mapping[str, Any], headers: Mapping[str, str]) -> EmbedCall:
    """The embedding ``Submission`` an OpenAI body asks for; typed errors (400s) otherwise."""
    for name in body:
        if name not in HONOURED:
            raise UnsupportedParameter(name, "not a parameter of /v1/embeddings")
    encoding = body.get("encoding_format")
    encoding = "float" if encoding is None else encoding
    if encoding not in ENCODINGS:
        raise UnsupportedParameter("encoding_format", "float or base64")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadInput("user", "must be a string")
    fields: dict[str, Any] = {name: body[name] for name in ("fee", "multiplier", "reference", "deadline_s",
                                                             "dimensions") if body.get(name) is not None}
    fields["model"] = body.get("model") if body.get("model") is not None else DEFAULT_MODEL
    fields["input"] = as_inputs(body.get("input"))
    openai_request.header_bid(fields, headers)
    return EmbedCall(Submission.from_dict(fields), encoding)


async def embed_call(request: Request) -> EmbedCall:
    body = openai_request.parse_body(limits.parse_json(await request.body(), service_of(request.app).settings))
    return submission(body, request.headers)


def usage(resp: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's embedding ``usage`` (input tokens only), plus what was offered, charged and refunded."""
    tokens = resp.get("prompt_tokens") or 0
    return {"prompt_tokens": tokens, "total_tokens": tokens,
            "offered": resp.get("offered"), "charged": resp.get("charged"), "refunded": resp.get("refunded")}


def shape(resp: dict[str, Any], model: str, encoding: str) -> dict[str, Any]:
    """A finished embedding job's response as OpenAI's ``list`` of ``embedding`` objects."""
    data = []
    for choice in resp.get("choices") or []:
        vector = choice.get("embedding")
        data.append({"object": "embedding", "index": choice["index"],
                     "embedding": vector if encoding == "base64" else decode_vector(vector)})
    return {"object": "list", "data": data, "model": model, "usage": usage(resp),
            "id": f"embd-{resp['job_id']}"}


def openapi_body() -> dict[str, Any]:
    """The request body's schema for the API docs, from ``HONOURED``."""
    schema = {"type": "object", "properties": {n: {} for n in sorted(HONOURED)}, "required": ["input"],
              "additionalProperties": False}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


# The key first (401 before a byte of the body is read), then the body (400/413).
@router.post("/v1/embeddings", openapi_extra=openapi_body())
async def embeddings(request: Request, key: AccountKey, call: Annotated[EmbedCall, Depends(embed_call)],
                     svc: Service, r: AsyncRedis) -> Any:
    # The one admission and answer of every paid endpoint (chat, text and Responses take it too).
    started = await completions.start(request, call.sub, False, key, svc, r)
    return await completions.answer(started, lambda resp: shape(resp, call.sub.model, call.encoding_format))
