"""A scripted stand-in for the model: answers a job at once with a fixed text.

For load and scale tests of the herder (``tests/bench/stub_worker.py``) and
for running a request's whole life in one process (``router.herder.stub``): the
result is a ``Result`` like ``runtime.run_envelope``'s; signed by its
caller as a real worker signs one, the herder settles it exactly as it settles a real one.
"""

from __future__ import annotations

import os
import time
from typing import Any

from llama_tasks.result import Choice, Result

#: What every scripted generation "says".
SCRIPTED_TEXT = "Llamas hum when they are content."


def answer(payload: dict[str, Any], task_id: str, worker: str, model_id: str,
           text: str = SCRIPTED_TEXT, completion_tokens: int = 0) -> dict[str, Any]:
    """The (unsigned) result document of a job (``payload`` as signed) that generated ``text``, in
    ``completion_tokens`` tokens each choice, in no time."""
    received_at = time.time()
    n = int(payload.get("n") or 1)
    return Result(
        task_id=task_id,
        job_id=payload["job_id"],
        attempt=payload["attempt"],
        model=payload["model"],
        model_id=model_id,
        choices=tuple(Choice(index=i, text=text, finish_reason="stop", completion_tokens=completion_tokens)
                      for i in range(n)),
        completion_tokens=completion_tokens * n,
        worker=worker,
        pid=os.getpid(),
        timings={
            "queue_wait_s": max(0.0, received_at - float(payload.get("issued_at", received_at))),
            "prompt_s": 0.0,
            "generation_s": 0.0,
            "tokens_per_s": 0.0,
        },
    ).to_json()
