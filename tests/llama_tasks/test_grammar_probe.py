"""The admission probe prices grammars on the real SmolLM2 vocabulary, in a process it can kill."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from llama_tasks import registry
from llama_tasks.constants import GRAMMAR_STEP_BUDGET_S
from llama_tasks.errors import BadGrammar, GrammarTooCostly
from llama_tasks.grammar_probe import GrammarProbe

#: The grammars people send: each must pass the default budget.
HONEST = [
    "root ::= [1-5]",
    "root ::= [a-z]{300}",
    'root ::= " positive" | " negative" | " factual"',
    'root ::= "{" ws "\\"mood\\":" ws [1-5] ws "}"\nws ::= [ \\t\\n]*',
]


@pytest.fixture(scope="module")
def probe() -> Iterator[GrammarProbe]:
    started = GrammarProbe()
    yield started
    started.close()


@pytest.fixture(scope="module")
def model_path() -> str:
    return registry.builtin_models()["smollm2"].path


@pytest.mark.parametrize("gbnf", HONEST)
def test_honest_grammars_pass_the_default_budget(probe: GrammarProbe, model_path: str, gbnf: str) -> None:
    probe.check(model_path, gbnf, GRAMMAR_STEP_BUDGET_S)


@pytest.mark.parametrize("n", [5, 30])
def test_nested_ambiguous_repetitions_are_refused(probe: GrammarProbe, model_path: str, n: int) -> None:
    # n=30: one token takes hours; the probe's child is killed at the step's deadline.
    with pytest.raises(GrammarTooCostly) as refused:
        probe.check(model_path, f'root ::= (("a"{{0,{n}}}){{0,{n}}}){{0,{n}}}', GRAMMAR_STEP_BUDGET_S)
    assert refused.value.budget_ms == GRAMMAR_STEP_BUDGET_S * 1000
    # The next grammar gets a fresh child.
    probe.check(model_path, HONEST[0], GRAMMAR_STEP_BUDGET_S)


def test_a_grammar_that_does_not_parse_is_bad(probe: GrammarProbe, model_path: str) -> None:
    with pytest.raises(BadGrammar):
        probe.check(model_path, "root ::= (", GRAMMAR_STEP_BUDGET_S)


def test_a_verdict_is_kept_so_a_repeated_grammar_costs_no_probe(model_path: str) -> None:
    probe, probed = GrammarProbe(), []
    real = probe._probe

    def counting(*args: object) -> object:
        probed.append(args)
        return real(*args)  # type: ignore[arg-type]

    probe._probe = counting  # type: ignore[method-assign]
    try:
        freezer = 'root ::= (("a"{0,30}){0,30}){0,30}'
        for _ in range(3):
            with pytest.raises(GrammarTooCostly):
                probe.check(model_path, freezer, GRAMMAR_STEP_BUDGET_S)
            probe.check(model_path, HONEST[0], GRAMMAR_STEP_BUDGET_S)
        assert len(probed) == 2
    finally:
        probe.close()
