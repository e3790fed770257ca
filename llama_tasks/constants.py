"""What workers and the herder agree on: Redis keys both read, the generation task's name."""

#: ``HERD_PREFIX + hostname`` → JSON heartbeat, expires unless refreshed.
HERD_PREFIX = "llamas:herd:"
#: ``STREAM_PREFIX + job_id`` → Redis stream of token events.
STREAM_PREFIX = "llamas:stream:"
#: ``CLAIM_PREFIX + job_id:attempt`` → which message claimed that attempt.
CLAIM_PREFIX = "llamas:claim:"

#: Heartbeats live for this many intervals, so one missed beat is tolerated.
HEARTBEAT_TTL_INTERVALS = 3

#: Name of the generation task, for senders that do not import the workers.
GENERATE_TASK = "llama_tasks.generate"
#: ``CANCEL_PREFIX + job_id`` exists while the herder wants a running job stopped.
CANCEL_PREFIX = "llamas:cancel:"
#: Redis stream on which workers publish each finished attempt's result for
#: the herders (a consumer group shares it among them); entries are deleted
#: once settled.
RESULTS_STREAM = "llamas:results"
#: Herders' consumer group on ``RESULTS_STREAM``.
RESULTS_GROUP = "herders"
