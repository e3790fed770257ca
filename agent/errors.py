"""The agent's exception tree: what can go wrong in the world, the exchange and grading."""

from __future__ import annotations

from llama_tasks.errors import LlamasError


class AgentError(LlamasError):
    """Raised when the example agent, its chat rooms or its exchange refuse an operation."""


class BadRoom(AgentError):
    """Raised when a room name is empty, too long or not printable."""

    fields = ("room", "limit")
    template = "room names are printable text of 1 to {limit} characters without spaces, got {room!r}"


class BadMessage(AgentError):
    """Raised when a chat message or nickname is empty, too long or not printable."""

    fields = ("reason",)
    template = "bad chat message: {reason}"


class BadReplayLine(AgentError):
    """Raised when a line of a replay file is neither JSON ``{nick, text}`` nor ``nick: text``."""

    fields = ("path", "line", "reason")
    template = "{path}:{line}: {reason}"


class UnknownMethod(AgentError):
    """Raised when a grading method name is not one the agent knows."""

    fields = ("method", "known")
    template = "unknown grading method {method!r}; known: {known}"


class UnparseableAnswer(AgentError):
    """Raised when the model's answer is not one the grading method can read."""

    fields = ("method", "text")
    template = "grading method {method} cannot read the answer {text!r}"


class BadRoomsFile(AgentError):
    """Raised when a labelled-rooms file (``llamas agent accuracy --file``) has a line it cannot use."""

    fields = ("path", "line", "reason")
    template = "{path}:{line}: {reason}"
