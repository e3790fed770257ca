"""What checking a result's provenance costs the herder, and signing it the worker.

A house worker's result of 128 tokens (about 500 characters), with its
signed claim, checked as settlement checks it (``provenance.check``: two
Ed25519 verifications, a sha256 of the document, an HMAC), and signed as a
worker signs it. An operator's result adds one indexed read of its key.

Run: ``python -m tests.bench.provenance [--runs N] [--each N]``; prints the
median microseconds per result.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from llama_tasks import signing
from router.core import provenance


@dataclass
class _Row:
    """What ``provenance.check`` reads of a job row."""

    id: str = "j" * 32
    attempt: int = 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--each", type=int, default=1000)
    args = parser.parse_args()
    row, herder = _Row(), Ed25519PrivateKey.generate()
    house = signing.OperatorSigner("", Ed25519PrivateKey.generate())
    keys = provenance.Keys(herder, house.key.public_key())
    doc = {"task_id": "t" * 32, "job_id": row.id, "attempt": 1, "model": "smollm2", "model_id": "a" * 64,
           "worker": "llama@host", "timings": {"generation_s": 1.25},
           "choices": [{"index": 0, "text": "word " * 100, "finish_reason": "length", "completion_tokens": 128,
                        "logprobs": None}]}
    secret = signing.attempt_secret(herder, row.id, row.attempt)
    signed = json.loads(json.dumps(house.attest_result(doc, secret)))
    claim = house.sign_claim({"job_id": row.id, "attempt": 1, "message": "t" * 32, "state": "done",
                              "worker": "llama@host", "pid": 1})
    checks, signs = [], []
    for _ in range(args.runs):
        started = time.perf_counter()
        for _ in range(args.each):
            assert provenance.check(None, keys, signed, row, claim).accepted  # type: ignore[arg-type]
        checks.append((time.perf_counter() - started) / args.each * 1e6)
        started = time.perf_counter()
        for _ in range(args.each):
            house.attest_result(doc, secret)
        signs.append((time.perf_counter() - started) / args.each * 1e6)
    print(f"herder: provenance.check {statistics.median(checks):.0f} µs per result (median of {args.runs} runs)")
    print(f"worker: attest_result {statistics.median(signs):.0f} µs per result")


if __name__ == "__main__":
    main()
