"""Each component started alone on a fresh home works or refuses with one line saying what to do."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.processes import ROOT, CeleryProcess
from tests.stack import free_port


def fresh_env(tmp_path, **extra: str) -> dict[str, str]:
    """The test session's environment on an empty home: no keys, no ledger, no models file."""
    home = tmp_path / "fresh-home"
    home.mkdir()
    return dict(os.environ, LLAMAS_HOME=str(home), **extra)


def dead_redis_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # a port nothing listens on


@pytest.mark.slow
def test_a_herder_without_its_signing_key_refuses_to_start(tmp_path):
    env = fresh_env(tmp_path)
    herder = CeleryProcess("router", "herder", "fresh-herder", 1, env, tmp_path / "herder.log",
                           extra=["-B", "-s", str(tmp_path / "beat-schedule")])
    try:
        assert herder.proc.wait(timeout=60) != 0
    finally:
        herder.stop()
    out = (tmp_path / "herder.log").read_text()
    key_file = tmp_path / "fresh-home" / "herder.key"
    assert f"llamas herder refuses to start: no signing key at {key_file}" in out
    assert "`llamas keys generate`" in out
    assert "Traceback" not in out and "ready." not in out


@pytest.mark.slow
def test_a_herder_with_an_unreadable_signing_key_refuses_to_start(tmp_path):
    env = fresh_env(tmp_path)
    (tmp_path / "fresh-home" / "herder.key").write_text("not a key\n")
    herder = CeleryProcess("router", "herder", "bad-key-herder", 1, env, tmp_path / "herder.log")
    try:
        assert herder.proc.wait(timeout=60) != 0
    finally:
        herder.stop()
    out = (tmp_path / "herder.log").read_text()
    assert "llamas herder refuses to start: the signing key" in out and "--force" in out
    assert "Traceback" not in out


def run_gateway(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uvicorn", "router.api:app", "--host", "127.0.0.1", "--port", str(free_port())],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )


def test_a_gateway_without_the_signing_key_refuses_to_start(tmp_path):
    res = run_gateway(fresh_env(tmp_path))
    assert res.returncode != 0
    assert "llamas gateway refuses to start: no signing key at" in res.stderr
    assert "`llamas keys generate`" in res.stderr and "Traceback" not in res.stderr


def test_an_older_home_without_the_house_key_is_refused_until_keys_generate_adds_it(tmp_path):
    """A home made before every worker signed its results has the herder's pair only."""
    env = fresh_env(tmp_path)
    home = tmp_path / "fresh-home"
    subprocess.run([sys.executable, "-m", "router.cli", "keys", "generate"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    herder_key = (home / "herder.key").read_bytes()
    (home / "house.key").unlink()
    (home / "house.pub").unlink()
    res = run_gateway(env)
    assert res.returncode != 0
    assert f"llamas gateway refuses to start: no usable house public key at {home / 'house.pub'}" in res.stderr
    assert "`llamas keys generate`" in res.stderr and "Traceback" not in res.stderr
    # Run again, it adds the house's pair and leaves the herder's as it was.
    again = subprocess.run([sys.executable, "-m", "router.cli", "keys", "generate"], cwd=ROOT, env=env,
                           capture_output=True, text=True)
    assert again.returncode == 0 and "house key:" in again.stdout and "private key:" not in again.stdout
    assert (home / "herder.key").read_bytes() == herder_key and (home / "house.pub").exists()
    refused = subprocess.run([sys.executable, "-m", "router.cli", "keys", "generate"], cwd=ROOT, env=env,
                             capture_output=True, text=True)
    assert refused.returncode == 1 and "--force" in refused.stderr


def test_a_gateway_without_redis_refuses_to_start(tmp_path):
    env = fresh_env(tmp_path, LLAMAS_REDIS_URL=dead_redis_url())
    subprocess.run([sys.executable, "-m", "router.cli", "keys", "generate"], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    res = run_gateway(env)
    assert res.returncode != 0
    assert "llamas gateway refuses to start: Redis at" in res.stderr and "does not answer" in res.stderr
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize("argv", [["info"], ["run", "hi", "--key", "llm_nobody"], ["quote", "hi"]])
def test_the_cli_without_redis_says_so_at_once(tmp_path, argv):
    env = fresh_env(tmp_path, LLAMAS_REDIS_URL=f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    started = time.monotonic()
    res = subprocess.run([sys.executable, "-m", "router.cli", *argv], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "does not answer" in res.stderr and "llamas up" in res.stderr
    assert "s3cret" not in res.stderr  # the broker's password is never printed
    assert "Traceback" not in res.stderr
    assert time.monotonic() - started < 15  # not after Celery's reconnection retries


def test_the_cli_without_a_key_says_how_to_get_one(tmp_path):
    env = fresh_env(tmp_path)
    env.pop("LLAMAS_API_KEY", None)
    res = subprocess.run([sys.executable, "-m", "router.cli", "run", "hi"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 1
    assert "no API key" in res.stderr and "Traceback" not in res.stderr
