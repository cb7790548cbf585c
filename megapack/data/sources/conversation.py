"""The parsed records every reader yields and every chat template consumes: a `Record` is a Conversation or a
Document; a record that cannot be parsed is a BadRecord."""
from __future__ import annotations

from dataclasses import dataclass, field

# Roles after normalisation. function_call / observation follow LLaMA-Factory's ShareGPT definition
# (a tool call made by the assistant, and the tool's answer).
SYSTEM, USER, ASSISTANT, FUNCTION_CALL, OBSERVATION = "system", "user", "assistant", "function_call", "observation"
ROLES = (SYSTEM, USER, ASSISTANT, FUNCTION_CALL, OBSERVATION)


@dataclass(frozen=True)
class Message:
    """One turn of a conversation, with a normalised role."""

    role: str
    content: str


@dataclass
class Conversation:
    """A validated chat: optional system prompt, then alternating prompt / response turns ending on a response."""

    messages: list[Message]
    system: str | None = None
    tools: str | None = None
    source: str = ""  # "file:line" (or "file:index") for error reports


@dataclass
class Document:
    """Plain text, a pre-training style record (the `plain` template trains on every token)."""

    text: str
    source: str = ""


@dataclass
class BadRecord:
    """A record a reader could not parse (into a Conversation or Document); counted by reason, never dropped
    silently."""

    source: str
    reason: str  # a stable category ("invalid JSON", "unknown role", ...) used as the count key
    detail: str = ""  # the specifics, shown in the first few examples


Record = Conversation | Document


@dataclass
class SkipReport:
    """Counts skipped records per reason and keeps the first few as `file:line: reason` lines."""

    max_examples: int = 5
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def add(self, bad: BadRecord) -> None:
        """Count one bad record."""
        self.counts[bad.reason] = self.counts.get(bad.reason, 0) + 1
        if len(self.examples) < self.max_examples:
            detail = f" ({bad.detail})" if bad.detail else ""
            self.examples.append(f"{bad.source}: {bad.reason}{detail}")
