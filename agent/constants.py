"""Redis key prefixes and task names of the agent, its chat rooms and its chatbot."""

#: ``ROOM_PREFIX + room`` → Redis stream of chat messages (fields ``nick``, ``text``).
ROOM_PREFIX = "llamas:room:"
#: Messages a room keeps (approximately): older ones are trimmed as new ones arrive.
ROOM_MAXLEN = 10_000
#: ``CHAT_INFLIGHT_PREFIX + room`` → reference of the chatbot's reply being generated.
CHAT_INFLIGHT_PREFIX = "llamas:chatbot:inflight:"
#: ``CHAT_ANSWERED_PREFIX + room`` → id of the last message the chatbot dealt with.
CHAT_ANSWERED_PREFIX = "llamas:chatbot:answered:"
#: ``CHAT_POLLS_PREFIX + room`` → how many times the chatbot has looked at the room.
CHAT_POLLS_PREFIX = "llamas:chatbot:polls:"

#: Celery task names, explicit so the herder's callbacks can name them.
TICK_TASK = "agent.tick"
RESPONSE_TASK = "agent.inference_response"
CHAT_POLL_TASK = "agent.chat_poll"
CHAT_RESPONSE_TASK = "agent.chat_response"
