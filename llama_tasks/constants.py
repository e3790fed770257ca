"""What workers and the herder agree on: Redis keys both read, the generation task's name."""

#: ``HERD_PREFIX + worker name`` → JSON heartbeat, expires unless refreshed (an operator's
#: worker is named ``<operator>/<hostname>``: ``WorkerSettings.worker_name``).
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
#: Default budget of one sampled token under a grammar, whole vocabulary, in CPU seconds. On
#: SmolLM2's 49,152-token vocabulary the grammars people send (a JSON schema of a dozen fields,
#: JSON mode, a 1-5 choice, 300 letters) cost 4-6 ms a step on one core; ``(("a"{0,5}){0,5}){0,5}``
#: costs 60-140 ms, and ``(("a"{0,30}){0,30}){0,30}`` hours. Ten times the dearest honest grammar.
GRAMMAR_STEP_BUDGET_S = 0.05
