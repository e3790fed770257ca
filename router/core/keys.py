"""Redis keys the herder writes for requesters (workers never touch these)."""

#: ``RESPONSE_PREFIX + job_id`` → the herder's final response for a waiting handle.
RESPONSE_PREFIX = "llamas:response:"
#: ``NOTIFY_PREFIX + job_id`` → a list pushed once the response is written.
NOTIFY_PREFIX = "llamas:notify:"
#: ``METRICS_PREFIX + name`` → Redis hashes holding the service's counters and
#: histograms, so every herder and gateway process adds to the same figures.
METRICS_PREFIX = "llamas:metrics:"
#: Hash of worker name → its last heartbeat seen by a dashboard and when, so a
#: worker whose heartbeat expired is shown as dead instead of vanishing.
DASHBOARD_SEEN = "llamas:dashboard:seen"
#: ``RATE_PREFIX + {window id}`` → sorted set of an account's admissions in the
#: last minute (member ``job_id|tokens``, score the admission time in ms), and
#: ``…:tokens`` their sum: its requests- and tokens-per-minute windows, shared
#: by every herder and gateway (``router.core.limits``).
RATE_PREFIX = "llamas:rate:"
#: ``DASHBOARD_SESSION_PREFIX + sha256(session id)`` → who a dashboard session signed in as
#: (the admin, or an account by its key's hash), expiring with the session.
DASHBOARD_SESSION_PREFIX = "llamas:dashboard:session:"
#: ``STREAMS_PREFIX + {key's hash, or "admin"}`` → sorted set of the key's open event streams (member a
#: stream id, score its lease's end in ms), shared by every gateway (``router.gateway.streams``).
STREAMS_PREFIX = "llamas:streams:"
#: Held (``SET NX PX``, a random token) by the one herder placing workers this tick (``router.core.placement``).
PLACEMENT_LOCK = "llamas:placement:lock"
#: Hash of worker → the Init placement sent it that its heartbeat does not show yet (JSON ``Pending``).
PLACEMENT_PENDING = "llamas:placement:pending"
#: List of placement's latest decisions, newest first (JSON), for the dashboard.
PLACEMENT_DECISIONS = "llamas:placement:decisions"
#: JSON object model → why no worker moves to it although its queue waits, as placement's latest step saw it.
PLACEMENT_WAITING = "llamas:placement:waiting"
