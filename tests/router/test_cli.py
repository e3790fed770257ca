"""The ``llamas`` command line, run as a real process against a running stack."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from router.core import views
from router.core.models import JobRow
from tests.processes import ROOT
from tests.stack import running_stack

pytestmark = pytest.mark.slow



def llamas(stack, *args: str, key: str = "", timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = dict(stack.env, LLAMAS_API_KEY=key, COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "router.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def sqlite_stack(tmp_path_factory, redis_url):
    """The CLI talks to the herder like any client: one backend is enough here."""
    yield from running_stack("sqlite", tmp_path_factory)


def test_info_shows_prices_herd_and_price_discovery(sqlite_stack):
    res = llamas(sqlite_stack, "info")
    assert res.returncode == 0, res.stderr
    for text in ("base fee 1", "fee per token 1", "llama@test", "price discovery", "×1.5"):
        assert text in res.stdout
    doc = json.loads(llamas(sqlite_stack, "info", "--json").stdout)
    assert doc["herd"][0]["worker"] == "llama@test"


def test_quote_counts_tokens(sqlite_stack):
    res = llamas(sqlite_stack, "quote", "Hello there", "--tokens", "10", "--no-chat")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().startswith("13 = 1 + 1 × (2 prompt + 10 max tokens)")


def test_run_json_and_stream(sqlite_stack):
    key, _ = sqlite_stack.account(10_000)
    res = llamas(sqlite_stack, "run", "Say hi.", "--tokens", "12", "--json", "--multiplier", "2", key=key)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["status"] == "done" and doc["charged"] + doc["refunded"] == doc["offered"]
    assert views.response(sqlite_stack.job(doc["job_id"]))["text"] == doc["text"]
    streamed = llamas(sqlite_stack, "run", "Once upon a time", "--no-chat", "--tokens", "8", "--stream", key=key)
    assert streamed.returncode == 0, streamed.stderr
    assert "charged" in streamed.stderr and streamed.stdout.strip()
    # Several choices: the first streams, the others follow whole, each under its header.
    several = llamas(sqlite_stack, "run", "Once upon a time", "--no-chat", "--tokens", "6", "--stream", "--n", "2",
                     "--reference", "cli-stream-n2", key=key)
    assert several.returncode == 0, several.stderr
    assert "--- choice 0" in several.stderr and "--- choice 1" in several.stderr
    with sqlite_stack.sessions.begin() as s:
        row = s.query(JobRow).filter(JobRow.reference == "cli-stream-n2").one()
    texts = [c["text"] for c in views.response(row)["choices"]]
    assert len(texts) == 2 and all(t.strip() and t.strip() in several.stdout for t in texts)


def test_jobs_list_show_cancel_and_raise(sqlite_stack):
    key, herder = sqlite_stack.account(100_000)
    blocker = sqlite_stack.occupy(herder)
    waiting = herder.run("Wait.", 4)
    raised = llamas(sqlite_stack, "jobs", "raise", waiting.id, "--multiplier", "3", key=key)
    assert raised.returncode == 0 and "×3.00" in raised.stdout, raised.stderr
    listed = llamas(sqlite_stack, "jobs", "list", key=key)
    assert waiting.id in listed.stdout and blocker.id in listed.stdout
    shown = json.loads(llamas(sqlite_stack, "jobs", "show", waiting.id, key=key).stdout)
    assert shown["state"] == "queued" and shown["position"] == 1
    cancelled = llamas(sqlite_stack, "jobs", "cancel", waiting.id, key=key)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    again = llamas(sqlite_stack, "jobs", "cancel", waiting.id, key=key)
    assert again.returncode == 1 and "is cancelled, not queued" in again.stderr
    assert "Traceback" not in again.stderr and len(again.stderr.strip().splitlines()) == 1
    # A running job is asked to stop: no error, and it ends charged for what it generated.
    stopping = llamas(sqlite_stack, "jobs", "cancel", blocker.id, key=key)
    assert stopping.returncode == 0 and "asked to stop" in stopping.stdout, stopping.stderr
    ended = blocker.result(timeout=60)
    assert ended["finish_reason"] == "cancelled" and ended["charged"] + ended["refunded"] == ended["offered"]


def test_errors_are_one_line_and_a_nonzero_exit(sqlite_stack):
    bad = llamas(sqlite_stack, "run", "hi", key="llm_wrong")
    assert bad.returncode == 1 and "no such account" in bad.stderr and "Traceback" not in bad.stderr
    no_key = llamas(sqlite_stack, "jobs", "list")
    assert no_key.returncode == 1 and "no API key" in no_key.stderr
    poor, _ = sqlite_stack.account(3)
    funds = llamas(sqlite_stack, "run", "hi", key=poor)
    assert funds.returncode == 1 and "has 3, needs" in funds.stderr
    fee = llamas(sqlite_stack, "run", "hi", "--fee", "1", key=poor)
    assert fee.returncode == 1 and "Insufficient payment" in fee.stderr
    assert all("Traceback" not in r.stderr for r in (funds, fee))


def test_models_keys_and_ledger_check(sqlite_stack):
    models = llamas(sqlite_stack, "models", "list")
    assert models.returncode == 0 and "smollm2" in models.stdout and "b179c9523d0e6a0f" in models.stdout
    keys = llamas(sqlite_stack, "keys", "show")
    assert keys.returncode == 0 and keys.stdout.startswith("LLAMAS_PUBLIC_KEY=")
    check = llamas(sqlite_stack, "ledger", "check")
    assert check.returncode == 0, check.stdout + check.stderr


def test_command_groups_come_from_entry_points_and_a_broken_one_is_skipped(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import EntryPoint

    import typer

    from router.cli.main import add_plugins

    target = typer.Typer()
    target.add_typer(typer.Typer(), name="keys")
    plugins = [
        EntryPoint("agent", "agent.cli:agent_app", "llamas.cli"),
        EntryPoint("broken", "no_such_package.cli:app", "llamas.cli"),
        EntryPoint("notatyper", "router.core.fees:PPM", "llamas.cli"),
        EntryPoint("keys", "agent.cli:world_app", "llamas.cli"),
    ]
    assert add_plugins(target, plugins) == ["agent"]
    skipped = capsys.readouterr().err
    for name in ("broken", "notatyper", "keys"):
        assert f"skipped the command group '{name}'" in skipped
    # The installed package registers the example agent's groups.
    from importlib.metadata import entry_points

    assert {e.name for e in entry_points(group="llamas.cli")} >= {"agent", "world"}
