"""Price a grammar's sampling cost before anything is held, in a process that can be killed.

``engine.grammar_step_cost`` walks into a grammar timing each step, and
stops once a step is over budget. But a single step of a pathological
grammar can itself take hours inside llama.cpp (C code, which no Python
thread can interrupt), so the walk runs in a child process: past its deadline
the child is killed, the grammar is refused, and the next grammar starts a
fresh child. The child is a new interpreter (``python -m
llama_tasks.grammar_probe``: never a fork of a threaded server, and nothing
of the parent's main module re-run), speaks one JSON line per message, and
loads each model's vocabulary once.
"""

from __future__ import annotations

import hashlib
import json
import os
import select
import subprocess
import sys
import threading
import time
from collections import OrderedDict
from typing import IO, Any

from llama_tasks.errors import BadGrammar, GrammarTooCostly, LlamasError

#: Grammars whose verdict is remembered (most recently used kept).
VERDICTS_KEPT = 1024
#: How long the child may take to start and load a vocabulary (imports llama.cpp; once per model).
LOAD_TIMEOUT_S = 60.0
#: The deadline of one step of the walk, at least. A step at the budget takes a fraction of
#: it (the probe times a sample of the vocabulary), so this is room for a loaded machine.
MIN_STEP_TIMEOUT_S = 0.5


def step_timeout_s(budget_s: float) -> float:
    """How long one step of the walk may take before the grammar is refused and the child killed."""
    return max(MIN_STEP_TIMEOUT_S, 10 * budget_s)


def serve(stdin: IO[str], stdout: IO[str]) -> None:
    """The child: answer ``{"path", "gbnf", "budget_s"}`` lines until stdin closes."""
    from llama_cpp import Llama

    from llama_tasks import engine

    vocabs: dict[str, Llama] = {}

    def say(status: str, value: Any) -> None:
        stdout.write(json.dumps([status, value]) + "\n")
        stdout.flush()

    for line in stdin:
        request = json.loads(line)
        path = request["path"]
        try:
            if path not in vocabs:
                vocabs[path] = Llama(model_path=path, vocab_only=True, verbose=False)
                engine.prepare_probe(vocabs[path])
            say("started", None)
            grammar = engine.compile_grammar(vocabs[path], request["gbnf"])
            cost = engine.grammar_step_cost(vocabs[path], grammar, request["budget_s"],
                                            on_step=lambda worst: say("step", worst))
            say("cost", cost)
        except BadGrammar as exc:
            say("bad", list(exc.args))
        except Exception as exc:  # reported to the parent, which refuses the grammar with it
            say("error", f"{type(exc).__name__}: {exc}")


#: A grammar's verdict: None (it may be sampled) or the error that refuses it, as its type and arguments.
Verdict = tuple[type[LlamasError], tuple[Any, ...]] | None


class _NotPriced(Exception):
    """The probe could not run (its process did not start, or failed): no verdict to keep."""


class GrammarProbe:
    """One child process that prices grammars; thread-safe, one grammar at a time."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pending = b""
        self._verdicts: OrderedDict[str, Verdict] = OrderedDict()

    def check(self, model_path: str, gbnf: str, budget_s: float) -> None:
        """Raise ``BadGrammar`` or ``GrammarTooCostly``, or return: the grammar may be sampled.

        A verdict is kept for the same grammar, model and budget: sending one
        grammar again (an honest client's schema, or an attacker's loop)
        costs a dictionary lookup, not a probe. A probe that could not run
        (its process did not start) refuses the grammar without a verdict.
        """
        key = hashlib.sha256(json.dumps([model_path, gbnf, budget_s]).encode()).hexdigest()
        with self._lock:
            if key in self._verdicts:
                self._verdicts.move_to_end(key)
            else:
                try:
                    self._verdicts[key] = self._probe(model_path, gbnf, budget_s)
                except _NotPriced as exc:
                    raise BadGrammar(f"the grammar could not be priced ({exc})") from None
                if len(self._verdicts) > VERDICTS_KEPT:
                    self._verdicts.popitem(last=False)
            verdict = self._verdicts[key]
        if verdict is not None:
            kind, args = verdict
            raise kind(*args)

    def _probe(self, model_path: str, gbnf: str, budget_s: float) -> Verdict:
        """None when the grammar may be sampled, else the error that refuses it, as ``(type, args)``."""
        proc = self._child()
        assert proc.stdin is not None
        try:
            proc.stdin.write(json.dumps({"path": model_path, "gbnf": gbnf, "budget_s": budget_s}).encode() + b"\n")
        except OSError:
            self._kill()
            raise _NotPriced("its probe process went away") from None
        answer = self._answer(proc, LOAD_TIMEOUT_S)
        if answer is None:
            raise _NotPriced("its probe process did not start")
        timeout = step_timeout_s(budget_s)
        while answer[0] in ("started", "step"):
            answer = self._answer(proc, timeout)
            if answer is None:
                # Still inside one step: the child spins in C, and only killing it stops that.
                return GrammarTooCostly, (round(timeout * 1000, 1), round(budget_s * 1000, 1))
        status, value = answer
        if status == "cost":
            return (GrammarTooCostly, (round(value * 1000, 1), round(budget_s * 1000, 1))) if value > budget_s else None
        if status == "bad":
            return BadGrammar, tuple(value)
        raise _NotPriced(str(value))

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _child(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._kill()
            # stderr is inherited: llama.cpp's own messages (never the grammar: compile_grammar withholds it).
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "llama_tasks.grammar_probe"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, bufsize=0,
            )
            self._pending = b""
        return self._proc

    def _answer(self, proc: subprocess.Popen[bytes], timeout: float) -> Any:
        """The child's next message, or None (the child killed) when none comes within ``timeout``."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        # Read raw from the descriptor: a buffered reader could hold the next line where select cannot see it.
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self._kill()
                return None
            chunk = os.read(fd, 65536)
            if not chunk:  # it exited
                self._kill()
                return None
            self._pending += chunk
        line, _, self._pending = self._pending.partition(b"\n")
        return json.loads(line)

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()


if __name__ == "__main__":
    serve(sys.stdin, sys.stdout)
