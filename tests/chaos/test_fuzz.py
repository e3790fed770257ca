"""Hypothesis against the gateway's request bodies, through the real uvicorn server.

Bodies are mostly a valid request with a few fields replaced by junk
(wrong types, NaN and Infinity literals, lone surrogates written as
``\\ud800`` escapes, huge numbers, nested junk, unknown keys), so the junk
reaches every check behind the first; the rest are arbitrary JSON, or bytes
that are not JSON or not UTF-8. Whatever arrives, the gateway must answer
below 500, every 4xx in OpenAI's error shape, and whatever it admitted must
run to the end without failing in a worker (what a worker would refuse,
admission must refuse first).
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import select

from router.core import ledger
from router.core.models import FAILED, JobRow
from tests.chaos.audit import Scenario
from tests.chaos.harness import FULL, ChaosStack, prompt, size

pytestmark = [pytest.mark.slow, pytest.mark.timeout(3600)]

EXAMPLES = size(200, 2000)
#: What the fuzzed account holds before each request: enough for a short answer, never a long one.
FUNDS = 100

#: Every field either endpoint knows (OpenAI's and ours), and a few that belong to other surfaces.
FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k",
    "min_p", "repeat_penalty", "seed", "stop", "stream", "stream_options", "multiplier", "fee", "reference",
    "deadline_s", "grammar", "json_schema", "response_format", "n", "logprobs", "top_logprobs",
    "frequency_penalty", "presence_penalty", "logit_bias", "echo", "best_of", "suffix", "tools", "tool_choice",
    "functions", "function_call", "parallel_tool_calls", "store", "user", "webhook_url", "callback_task",
]

#: What each endpoint may accept (README, OpenAI's API and our extras); the neutral ones only at the
#: value that asks for nothing (``n: 1``). Anything else must be refused, never silently dropped.
HONOURED = {"model", "max_tokens", "temperature", "top_p", "stop", "stream", "stream_options", "seed", "top_k",
            "min_p", "repeat_penalty", "multiplier", "fee", "reference", "deadline_s", "grammar", "json_schema"}
NEUTRAL = {"n", "logprobs", "top_logprobs", "frequency_penalty", "presence_penalty", "logit_bias", "echo",
           "best_of", "suffix", "tools", "tool_choice", "functions", "function_call", "parallel_tool_calls", "store"}
ACCEPTED = {
    "/v1/chat/completions": HONOURED | NEUTRAL | {"messages", "max_completion_tokens", "response_format"},
    "/v1/completions": HONOURED | NEUTRAL | {"prompt"},
}

SURROGATES = st.integers(0xD800, 0xDFFF).map(chr)
TEXTS = st.one_of(
    st.text(max_size=20),
    st.lists(st.one_of(st.characters(), SURROGATES), min_size=1, max_size=6).map("".join),
    st.sampled_from(["", " ", "\x00", "\ud800", "a\udfffb", "\u202e", "<|im_end|>", "💥", "null", "NaN",
                     "root ::= [1-5", "root ::= [a-z]{3}", "{", "user", "system", "assistant", "hacker",
                     "smollm2", "text", "json_object", "json_schema", "x" * 300_000]),
)
NUMBERS = st.one_of(
    st.integers(-3, 3000),
    st.sampled_from([2**31, 2**63, 2**64, -(2**63) - 1, 10**30, 10**400]),
    st.floats(),  # NaN and ±Infinity included: json.dumps writes them as bare literals
    st.sampled_from([math.nan, math.inf, -math.inf, 1e308, 5e-324, -0.0, 0.5, 1.5, 40.5]),
)
#: Object keys: names the gateway knows, any text, and lone surrogates (keys are echoed in errors too).
KEYS = st.one_of(st.sampled_from(FIELDS), TEXTS, SURROGATES)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXTS)
JUNK = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=4),
    max_leaves=10,
)
#: Shapes some fields take when nearly right, so the checks behind the type checks are reached too.
NEARLY = {
    "messages": st.lists(st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system"]), JUNK),
                                                "content": st.one_of(TEXTS.map(prompt), JUNK)}), max_size=3),
    "prompt": TEXTS.map(prompt),
    "stop": st.one_of(TEXTS, st.lists(TEXTS, max_size=6)),
    "response_format": st.fixed_dictionaries({"type": st.one_of(TEXTS, JUNK)},
                                             optional={"json_schema": JUNK}),
    "json_schema": st.dictionaries(st.one_of(st.sampled_from(["type", "properties", "enum", "items"]), KEYS), JUNK,
                                   max_size=3),
    "stream_options": st.dictionaries(st.sampled_from(["include_usage", "x"]), JUNK, max_size=2),
}
RAW = st.one_of(
    st.binary(max_size=64),
    st.sampled_from([b"", b"{", b"NaN", b"[1, 2]", b"null", b"\xef\xbb\xbf{}", b'{"prompt": "\xff\xfe"}',
                     b'{"prompt": "a" ', b'{"prompt": "x", "prompt": 1}', b'{"max_tokens": 1e999}']),
)
#: Header values h11 will send (no edge spaces): the gateway, not the client library, is under test.
HEADER_TEXT = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), max_size=12)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str]]:
    """(path, body bytes, extra headers) of one request."""
    chat = draw(st.booleans())
    path = "/v1/chat/completions" if chat else "/v1/completions"
    headers: dict[str, str] = {}
    for name in draw(st.sets(st.sampled_from(["X-Llamas-Multiplier", "X-Llamas-Fee"]), max_size=2)):
        headers[name] = draw(HEADER_TEXT)
    shape = draw(st.sampled_from(["nearly"] * 6 + ["object", "any", "raw"]))
    if shape == "raw":
        return path, draw(RAW), headers
    body: Any
    if shape == "any":
        body = draw(JUNK)
    elif shape == "object":
        body = draw(st.dictionaries(st.one_of(st.sampled_from(FIELDS), TEXTS), JUNK, max_size=6))
    else:
        body = {"model": "smollm2", "max_tokens": draw(st.integers(1, 4)), "temperature": 0.0,
                "stream": draw(st.booleans())}
        body |= ({"messages": [{"role": "user", "content": prompt("Say hi.")}]} if chat
                 else {"prompt": prompt("Once upon a time")})
        for field in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
            if draw(st.integers(0, 5)) == 0:
                body.pop(field, None)
            else:
                body[field] = draw(NEARLY[field] if field in NEARLY and draw(st.booleans()) else JUNK)
    # ensure_ascii writes a lone surrogate as a \ud800 escape; allow_nan writes NaN and Infinity literals.
    return path, json.dumps(body, ensure_ascii=True, allow_nan=True).encode(), headers


def openai_error(status: int, content: bytes, what: str) -> None:
    """A 4xx body must be ``{"error": {"message": str, "type": str, "code": …}}``."""
    try:
        doc = json.loads(content)
    except ValueError:
        raise AssertionError(f"{status} with a body that is not JSON for {what}: {content[:300]!r}") from None
    err = doc.get("error") if isinstance(doc, dict) else None
    assert isinstance(err, dict) and isinstance(err.get("message"), str) and isinstance(err.get("type"), str) \
        and "code" in err, f"{status} not in OpenAI's error shape for {what}: {content[:300]!r}"


@pytest.mark.chaos("gateway request-body fuzz")
def test_the_gateway_answers_any_body_without_a_5xx(chaos: ChaosStack, scenario: Scenario) -> None:
    key, _ = chaos.account(FUNDS)
    http = scenario.http(timeout_s=120)

    def top_up() -> None:
        with chaos.sessions.begin() as s:
            account = ledger.account_by_key(s, key)
            missing = FUNDS - ledger.balance(s, account)
            if missing > 0:
                ledger.deposit(s, account, missing)

    # The quick run explores the same examples every time, so `make test` is not flaky; the full run explores anew.
    @settings(max_examples=EXAMPLES, deadline=None, database=None, print_blob=True, derandomize=not FULL,
              suppress_health_check=list(HealthCheck))
    @given(case=requests(), authorised=st.integers(0, 19).map(bool))
    def answers_below_500(case: tuple[str, bytes, dict[str, str]], authorised: bool) -> None:
        path, data, headers = case
        top_up()
        headers = headers | {"Content-Type": "application/json"}
        headers["Authorization"] = f"Bearer {key if authorised else 'llm_not-a-key'}"
        scenario.sent()
        with http.stream("POST", path, content=data, headers=headers) as reply:
            content = reply.read()
        what = f"POST {path} {data[:300]!r}"
        assert reply.status_code < 500, f"{reply.status_code} for {what}: {content[:300]!r}"
        if reply.status_code >= 400:
            openai_error(reply.status_code, content, what)
            return
        try:
            sent = json.loads(data)
        except ValueError:
            sent = None
        assert isinstance(sent, dict), f"{reply.status_code} for a body that is not a JSON object: {what}"
        extra = set(sent) - ACCEPTED[path]
        assert not extra, f"{sorted(extra)} silently ignored (200) for {what}"
        if reply.headers.get("content-type", "").startswith("text/event-stream"):
            assert content.rstrip().endswith(b"data: [DONE]"), f"a stream broke off for {what}: {content[-300:]!r}"
        else:
            assert json.loads(content)["choices"], f"no choices for {what}"

    try:
        answers_below_500()
    finally:
        http.close()
    with chaos.sessions.begin() as s:
        failed = list(s.execute(select(JobRow.id, JobRow.error, JobRow.request).where(
            JobRow.seq > scenario.start_seq, JobRow.state == FAILED)))
    assert not failed, "admitted, then failed in a worker (admission must refuse these): " + "; ".join(
        f"{job_id} {error}: {request[:200]}" for job_id, error, request in failed)
