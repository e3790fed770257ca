import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from llama_tasks.settings import WorkerSettings, queue_for
from tests.processes import ROOT


def test_visibility_timeout_must_exceed_hard_time_limit():
    with pytest.raises(ValidationError, match="must exceed LLAMAS_TIME_LIMIT_S"):
        WorkerSettings(visibility_timeout_s=300, time_limit_s=300, soft_time_limit_s=200)
    WorkerSettings(visibility_timeout_s=301, time_limit_s=300, soft_time_limit_s=200)


def test_soft_limit_must_be_below_hard_limit():
    with pytest.raises(ValidationError, match="SOFT_TIME_LIMIT_S"):
        WorkerSettings(soft_time_limit_s=400, time_limit_s=330)


def test_one_queue_per_model():
    assert queue_for("smollm2") == "llama.smollm2"
    assert WorkerSettings(model="qwen").queue == "llama.qwen"


def test_worker_refuses_to_start_when_visibility_timeout_is_too_short():
    env = dict(os.environ, LLAMAS_VISIBILITY_TIMEOUT_S="60", LLAMAS_TIME_LIMIT_S="120")
    proc = subprocess.run(
        [sys.executable, "-m", "celery", "-A", "llama_tasks", "worker"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode != 0
    assert "LLAMAS_VISIBILITY_TIMEOUT_S (60s) must exceed LLAMAS_TIME_LIMIT_S (120s)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_celery_config_follows_settings(celery_app):
    conf = celery_app.conf
    assert conf.task_serializer == "json" and conf.accept_content == ["json"]
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.worker_prefetch_multiplier == 1
    assert conf.worker_cancel_long_running_tasks_on_connection_loss
    assert conf.broker_transport_options["visibility_timeout"] > conf.task_time_limit
    assert conf.task_soft_time_limit < conf.task_time_limit
    assert conf.result_expires > 0
    assert conf.task_default_queue == "llama.smollm2"
