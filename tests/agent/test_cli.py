"""``llamas world …`` and ``llamas agent …`` through typer's CliRunner, on the real Redis.

Every refusal must be one ``error:`` line and exit status 1, never a traceback.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from agent import grading
from agent import rooms as labelled
from agent.cli import agent_app, world_app
from agent.exchange import ActionResponse
from agent.store import OutcomeStore
from agent.strategy import BUY, ERROR, Verdict
from agent.world import World

cli = typer.Typer()
cli.add_typer(world_app, name="world")
cli.add_typer(agent_app, name="agent")


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The agent's own databases in a fresh home."""
    return {"LLAMAS_HOME": str(tmp_path), "LLAMAS_AGENT_DATABASE_URL": f"sqlite:///{tmp_path / 'agent.db'}",
            "LLAMAS_AGENT_EXCHANGE_URL": f"sqlite:///{tmp_path / 'exchange.db'}"}


def run(*args: str, env: dict[str, str] | None = None) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args), env=env)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


def one_error_line(output: str) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in output, output
    return lines[0]


def test_post_and_history(room: str, r):
    assert run("world", "post", room, "Hello herd!", "--nick", "ana")[0] == 0
    assert run("world", "post", room, "Hi ana.")[0] == 0
    code, out = run("world", "history", room, "-n", "5")
    assert code == 0 and "<ana> Hello herd!" in out and "<you> Hi ana." in out
    assert out.index("Hello herd!") < out.index("Hi ana.")
    assert "is empty" in run("world", "history", room + "-nobody")[1]


def test_replay_plays_a_file_and_refuses_a_bad_one_before_posting(room: str, r, tmp_path: Path):
    good = tmp_path / "chat.txt"
    good.write_text('ana: first\n{"nick": "ben", "text": "second"}\n')
    code, out = run("world", "replay", str(good), "--room", room, "--pace", "0")
    assert code == 0 and "played 2 messages" in out
    assert [m.text for m in World(r).history(room, 10)] == ["first", "second"]
    bad = tmp_path / "bad.txt"
    bad.write_text("ana: fine\nno colon\n")
    code, out = run("world", "replay", str(bad), "--room", room + "-bad", "--pace", "0")
    assert code == 1 and one_error_line(out).endswith('bad.txt:2: expected "nick: text" or a JSON object')
    assert World(r).history(room + "-bad", 10) == []
    code, out = run("world", "replay", str(tmp_path / "missing.txt"), "--room", room, "--pace", "0")
    assert code == 1 and "No such file or directory" in one_error_line(out)


def test_replay_without_a_file_plays_the_shipped_sample(room: str, r):
    code, out = run("world", "replay", "--room", room, "--pace", "0")
    assert code == 0 and len(World(r).history(room, 100)) >= 12


def test_refusals_are_one_line(room: str):
    code, out = run("world", "post", "two words", "hi")
    assert code == 1 and "room names are printable text" in one_error_line(out)
    code, out = run("world", "history", room, env={"LLAMAS_REDIS_URL": "redis://127.0.0.1:1/0"})
    assert code == 1 and one_error_line(out).startswith("error: cannot use Redis at redis://127.0.0.1:1/0")
    code, out = run("agent", "status", env={"LLAMAS_AGENT_HISTORY_N": "0"})
    assert code == 1 and "(LLAMAS_AGENT_HISTORY_N)" in one_error_line(out)
    code, out = run("agent", "accuracy", "--method", "vibes")
    assert code == 1 and "unknown grading method 'vibes'" in one_error_line(out)


def test_accuracy_refuses_a_bad_rooms_file_in_one_line_before_loading_a_model(tmp_path: Path):
    bad = tmp_path / "rooms.jsonl"
    bad.write_text('{"label": "positive", "messages": [{"nick": "ana", "text": "yay"}]}\n{"label": "meh"}\n')
    code, out = run("agent", "accuracy", "--file", str(bad))
    assert code == 1 and one_error_line(out).endswith(
        "rooms.jsonl:2: label must be one of positive, negative, neutral, got 'meh'")
    code, out = run("agent", "accuracy", "--file", str(tmp_path / "missing.jsonl"))
    assert code == 1 and "No such file or directory" in one_error_line(out)
    code, out = run("agent", "accuracy", "--split", "train")
    assert code == 1 and "--split must be tune, heldout or all, got 'train'" in one_error_line(out)


def test_status_of_a_new_agent_shows_zeros(env: dict[str, str]):
    code, out = run("agent", "status", env=env)
    assert code == 0, out
    assert "Buy 0 · Skip 0 · Error 0 · Requests 0" in out
    assert "position  0 LLAMA · 100000 CRED" in out


def test_status_shows_outcomes_spend_and_position(env: dict[str, str]):
    store = OutcomeStore.open(env["LLAMAS_AGENT_DATABASE_URL"])
    store.begin("t1", "lobby", "agent:t1", "1-0", "{}", 100.0)
    store.requested("t1", "job-one", 190)
    store.finish("t1", Verdict(BUY, 4), 101.0, {"job_id": "job-one", "charged": 182, "text": " positive"},
                 ActionResponse("agent:t1", "filled", "", 250, 1_000, 4))
    store.begin("t2", "lobby", "agent:t2", "2-0", "{}", 102.0)
    store.finish("t2", Verdict(ERROR, None, "InsufficientFunds: account a has 0, needs 185"), 103.0)
    store.close()
    code, out = run("agent", "status", env=env)
    assert code == 0, out
    assert "Buy 1 · Skip 0 · Error 1 · Requests 1" in out
    assert "spend     182 paid to the herder for grades · 182 per grade (1 graded)" in out
    assert "InsufficientFunds: account a has 0, needs 185" in out and "4 LLAMA for 1000 CRED" in out


def test_status_refuses_an_unusable_database(env: dict[str, str], tmp_path: Path):
    (tmp_path / "file").write_text("")
    env = env | {"LLAMAS_AGENT_DATABASE_URL": f"sqlite:///{tmp_path / 'file' / 'agent.db'}"}
    code, out = run("agent", "status", env=env)
    assert code == 1 and one_error_line(out).startswith("error: ")


def _users_file(tmp_path: Path) -> Path:
    rooms = tmp_path / "mine.jsonl"
    chosen = [r for r in labelled.shipped(labelled.TUNE) if r.room in ROOMS]
    rooms.write_text("\n".join(json.dumps({"room": r.room, "label": r.label, "messages": [
        {"nick": m.nick, "text": m.text} for m in r.messages]}) for r in chosen))
    return rooms


@pytest.mark.slow
def test_accuracy_measures_a_users_file_with_the_real_model(env: dict[str, str], tmp_path: Path):
    rooms = _users_file(tmp_path)
    code, out = run("agent", "accuracy", "--file", str(rooms), "--verbose", env=env)
    assert code == 0, out
    assert f"model smollm2: 3 labelled rooms (all of {rooms})" in out
    # The agent's own method and calibration; a user's rooms are not the ones it was fitted on.
    assert "prob-news: the shipped calibration fitted on the tuning half\n" in out
    assert "prob-news: 3/3 = 100% (positive 1/1, negative 1/1, neutral 1/1); buy decisions right 3/3" in out
    assert "ok pos-027  positive → positive   grade " in out
    matrix = out[out.index("true \\ predicted"):].splitlines()
    assert matrix[0].split()[-3:] == ["positive", "negative", "neutral"]
    assert [line.split() for line in matrix[1:4]] == [
        ["positive", "1", "0", "0"], ["negative", "0", "1", "0"], ["neutral", "0", "0", "1"]]


def _numbers(line: str) -> list[float]:
    return [float(x) for x in re.findall(r"-?\d+\.\d+", line)]


@pytest.mark.slow
def test_the_shipped_prior_is_the_one_measured_with_the_bundled_model(env: dict[str, str], tmp_path: Path):
    code, out = run("agent", "accuracy", "--file", str(_users_file(tmp_path)), "--method", "prob-fewshot", env=env)
    assert code == 0, out
    measured = _numbers(next(line for line in out.splitlines() if "prob-fewshot: content-free prior" in line))
    shipped = list((grading.shipped_prior("smollm2", "prob-fewshot") or {}).values())
    # Within what llama.cpp's CPU kernels (AVX2, AVX-512) move it by; a changed prompt moves it far more.
    assert measured == pytest.approx(shipped, abs=0.06)


@pytest.mark.slow
def test_refit_fits_the_default_calibration_again_on_the_tuning_half(env: dict[str, str], tmp_path: Path):
    code, out = run("agent", "accuracy", "--file", str(_users_file(tmp_path)), "--refit", env=env)
    assert code == 0, out
    line = next(line for line in out.splitlines() if "calibration fitted on 90 tuning rooms" in line)
    shipped = grading.shipped_affine("smollm2", grading.DEFAULT_METHOD)
    assert shipped is not None
    assert _numbers(line) == pytest.approx([*(w for row in shipped.weights for w in row), *shipped.bias], abs=0.25)
    assert "prob-news: 3/3 = 100%" in out


#: Three tuning rooms the bundled model grades clearly right (greedy, so every time).
ROOMS = ("pos-027", "neg-047", "neu-033")
