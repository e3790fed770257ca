"""Redis key prefixes used by the workers; the herder reads the same keys."""

#: ``HERD_PREFIX + hostname`` → JSON heartbeat, expires unless refreshed.
HERD_PREFIX = "llamas:herd:"
#: ``STREAM_PREFIX + job_id`` → Redis stream of token events.
STREAM_PREFIX = "llamas:stream:"
#: ``CLAIM_PREFIX + job_id:attempt`` → which message claimed that attempt.
CLAIM_PREFIX = "llamas:claim:"

#: Heartbeats live for this many intervals, so one missed beat is tolerated.
HEARTBEAT_TTL_INTERVALS = 3
#: ``RESPONSE_PREFIX + job_id`` → the herder's final response for a waiting handle.
RESPONSE_PREFIX = "llamas:response:"
#: ``NOTIFY_PREFIX + job_id`` → a list pushed once the response is written.
NOTIFY_PREFIX = "llamas:notify:"

#: Name of the generation task, for senders that do not import the workers.
GENERATE_TASK = "llama_tasks.generate"
#: ``METRICS_PREFIX + name`` → Redis hashes holding the service's counters and
#: histograms, so every herder and gateway process adds to the same figures.
METRICS_PREFIX = "llamas:metrics:"
#: ``CANCEL_PREFIX + job_id`` exists while the herder wants a running job stopped.
CANCEL_PREFIX = "llamas:cancel:"
