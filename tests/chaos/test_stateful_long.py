"""The herder core's Hypothesis state machine (tests/router/test_stateful.py), run long.

``make test`` runs it at 50 examples of up to 30 steps; here it runs until at
least ``TARGET_STEPS`` steps have been executed on each ledger backend,
counted as they run (Hypothesis may end an example early, so examples ×
steps is only an upper bound).
"""

from __future__ import annotations

from typing import ClassVar

import pytest
from hypothesis import settings
from hypothesis.stateful import invariant, run_state_machine_as_test

from router.herder.tokens import TokenCounter
from tests.chaos.harness import FULL
from tests.router.conftest import postgres_url  # noqa: F401  (the PostgreSQL backend of `databases`)
from tests.router.test_stateful import MACHINE_SETTINGS, Databases, HerderCore, databases, token_counter  # noqa: F401  (fixtures)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(3600),
    pytest.mark.skipif(not FULL, reason="10,000 state-machine steps per ledger run in the full chaos suite only "
                                        "(LLAMAS_CHAOS_FULL=1, `make chaos`); `make test` runs the short machine"),
]

TARGET_STEPS = 10_000
#: One batch of examples; batches repeat until the target is reached.
BATCH = settings(MACHINE_SETTINGS, max_examples=100, stateful_step_count=50, database=None)


class CountedCore(HerderCore):
    """The same machine, counting the steps it executes."""

    steps: ClassVar[int] = 0

    # Invariants run after every step, and not before the machine's @initialize rule has run.
    @invariant()
    def count_the_step(self) -> None:
        CountedCore.steps += 1


def test_the_herder_core_keeps_the_books_for_ten_thousand_steps(databases: Databases,  # noqa: F811
                                                                token_counter: TokenCounter) -> None:  # noqa: F811
    CountedCore.steps = 0
    batches = 0
    while CountedCore.steps < TARGET_STEPS:
        # Any factory will do (as in test_stateful.py); the stub asks for a class.
        run_state_machine_as_test(lambda: CountedCore(databases, token_counter),  # type: ignore[arg-type]
                                  settings=BATCH)
        batches += 1
    print(f"{CountedCore.steps} steps in {batches} batch(es) of {BATCH.max_examples} examples")
    assert CountedCore.steps >= TARGET_STEPS
