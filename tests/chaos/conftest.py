"""Fixtures of the chaos suite: the stack (one per ledger backend), a scenario window audited
after every test, the ghost slot; and the summary table at the end of the session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.chaos.audit import RESULTS, Scenario, table, write_results
from tests.chaos.harness import FULL, ChaosStack, Ghost, start_stack

RESULTS_FILE = Path(__file__).parent / "results" / "latest.md"
BACKENDS = ["sqlite", "postgresql"] if FULL else ["sqlite"]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "chaos(title): a chaos scenario, audited and listed under this title")


@pytest.fixture(scope="package", params=BACKENDS)
def chaos(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosStack]:
    """The whole service on its own Redis, shared by the scenarios of one backend."""
    yield from start_stack(request.param, tmp_path_factory)


@pytest.fixture
def scenario(request: pytest.FixtureRequest, chaos: ChaosStack) -> Iterator[Scenario]:
    """The test's window on the stack; afterwards the service is drained and audited, and the row kept."""
    marker = request.node.get_closest_marker("chaos")
    title = marker.args[0] if marker else request.node.originalname
    callspec = getattr(request.node, "callspec", None)
    params = [str(v) for k, v in (callspec.params.items() if callspec else []) if k != "chaos"]
    window = Scenario(chaos, f"{title}{' (' + ', '.join(params) + ')' if params else ''} [{chaos.kind}]")
    yield window
    row, problems = window.finish()
    RESULTS.append(row)
    assert not problems, f"{window.title}: the audit found\n  " + "\n  ".join(problems)


@pytest.fixture
def ghost(scenario: Scenario) -> Iterator[Ghost]:
    """A ghost model's only slot, taken (set up after, and released before, the scenario's audit)."""
    slot = Ghost(scenario.stack)
    scenario.sent()
    try:
        yield slot
    finally:
        slot.release()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, exitstatus: int,
                            config: pytest.Config) -> None:
    if not RESULTS:
        return
    terminalreporter.write_sep("=", "chaos summary")
    for line in table(RESULTS):
        terminalreporter.write_line(line)
    stats = terminalreporter.stats
    summary = ", ".join(f"{len(stats[k])} {k}" for k in ("passed", "failed", "error", "skipped") if stats.get(k))
    if not FULL:
        # The committed table is the full run's; `make test` must leave the tree as it found it.
        return
    write_results(RESULTS, RESULTS_FILE, "full",
                  {"command": "LLAMAS_CHAOS_FULL=1 pytest tests/chaos", "summary": summary or "nothing ran"})
    terminalreporter.write_line("written to tests/chaos/results/latest.md")
