"""Celery settings for every llamas process, all taken from ``SharedSettings``.

This module only translates settings into Celery's names; it reads no
environment itself. Invalid settings (for instance a Redis visibility timeout
that does not exceed the hard time limit) stop the process here, with the
reason, before anything connects.
"""

from llama_tasks.settings import get_shared_settings

# The shared settings, not the worker's: the herder and the agent load this
# module too, and a worker-only setting must not stop them.
_settings = get_shared_settings()

broker_url = _settings.redis_url
result_backend = _settings.redis_url
broker_connection_retry_on_startup = True
# kombu's Redis transport reads the visibility timeout from here; it must
# exceed the hard time limit or a running job would be delivered twice.
broker_transport_options = {"visibility_timeout": _settings.visibility_timeout_s}
result_backend_transport_options = {"visibility_timeout": _settings.visibility_timeout_s}

task_serializer = "json"
result_serializer = "json"
accept_content = ["json"]
result_accept_content = ["json"]

# A job is acknowledged only once it finished; a child killed mid-job puts
# its message back for another child.
task_acks_late = True
task_reject_on_worker_lost = True
worker_prefetch_multiplier = 1
worker_cancel_long_running_tasks_on_connection_loss = True
# Celery's consumer, surviving a broker lost while messages are unacknowledged
# (Celery 5.7 otherwise stops the worker: see llama_tasks/consumer.py).
worker_consumer = "llama_tasks.consumer:Consumer"

task_soft_time_limit = _settings.soft_time_limit_s
task_time_limit = _settings.time_limit_s
result_expires = _settings.result_expires_s
# Task arguments stay out of the result store: requests carry API keys.
result_extended = False

# Beat (the herder's -B) keeps its schedule state with the rest of ours.
beat_schedule_filename = str(_settings.home / "celerybeat-schedule")
# The inference workers' pool (threads, one per slot) is set by their app;
# the herder's processes stay prefork.
worker_pool = "prefork"
# Task events let Flower show tasks as they run.
worker_send_task_events = True
task_send_sent_event = True
task_track_started = True
