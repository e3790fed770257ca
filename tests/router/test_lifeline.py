"""Children die with their parent: a SIGKILLed parent leaves no orphan behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from llama_tasks import lifeline
from tests.processes import ROOT, CeleryProcess, alive, children, wait_for

pytestmark = pytest.mark.skipif(lifeline.UNSUPPORTED is not None, reason=str(lifeline.UNSUPPORTED))


def test_a_child_that_asked_dies_when_its_parent_is_killed(tmp_path):
    # parent: starts a child that asks for SIGTERM on its parent's death, prints its pid, waits.
    parent_code = textwrap.dedent("""
        import os, signal, subprocess, sys
        from functools import partial
        from llama_tasks import lifeline
        lifeline.prepare()
        child = subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"],
                                 preexec_fn=partial(lifeline.die_with_parent, signal.SIGTERM, os.getpid()))
        print(child.pid, flush=True)
        signal.pause()  # until killed
    """)
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        parent.kill()
        parent.wait()
        wait_for(lambda: not alive(child), 10, f"child {child} to die with its parent")
    finally:
        parent.kill()
        parent.wait()


def test_a_child_whose_parent_died_before_it_asked_dies_at_once():
    # The race the parent_pid argument closes: by the time the child asks,
    # it has already been re-parented, so it must signal itself.
    code = "import signal; from llama_tasks import lifeline; lifeline.die_with_parent(signal.SIGTERM, 1)"
    proc = subprocess.run([sys.executable, "-c", code + "; signal.pause()"], cwd=ROOT, timeout=60)
    assert proc.returncode == -signal.SIGTERM


@pytest.mark.slow
def test_sigkill_of_the_herder_main_process_takes_its_beat_and_pool_children_along(tmp_path):
    herder = CeleryProcess("router", "herder", f"lifeline-{os.getpid()}", 2, dict(os.environ),
                           tmp_path / "herder.log", extra=["-B", "-s", str(tmp_path / "beat-schedule")])
    try:
        herder.wait_log("ready.")
        # Two pool children and the embedded beat, all forked by the main process.
        wait_for(lambda: len(children(herder.proc.pid)) == 3, 30, "two pool children and the beat")
        wait_for(lambda: "beat: Starting..." in herder.output(), 30, "the beat")
        kids = children(herder.proc.pid)
        herder.proc.send_signal(signal.SIGKILL)
        herder.proc.wait()
        wait_for(lambda: not any(alive(p) for p in kids), 20,
                 f"beat and pool children {kids} to exit:\n{herder.output()}")
    finally:
        try:  # leave no orphan behind when the feature is broken
            os.killpg(herder.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        herder.stop()
