"""Plain value types of the public API."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict


@dataclass(frozen=True, init=False)
class IntentCategory:
    """One intent of the domain, as the seed README writes it:
    ``IntentCategory("OUTAGE", "Production issues", ["Service is down", "Error 500"])``.

    Args:
        name: a stable identifier (letters, digits, ``_``, ``-``, ``.``; at most 100 characters).
        description: what the intent covers, in words; it helps the classifier.
        examples: example user phrases.
        threshold: confidence needed for the agent to answer alone (``None``: the configured default).
        handoff: always hand threads of this intent to a human.
        system_prompt: extra instructions for the LLM on this intent.
        on_low_confidence: below the threshold, ``"handoff"`` (a human takes the thread) or
            ``"clarify"`` (the agent asks which of the likely intents the user means).
    """

    name: str
    description: str
    examples: tuple[str, ...]
    threshold: float | None
    handoff: bool
    system_prompt: str
    on_low_confidence: str

    def __init__(
        self,
        name: str,
        description: str = "",
        examples: Sequence[str] = (),
        threshold: float | None = None,
        handoff: bool = False,
        system_prompt: str = "",
        on_low_confidence: str = "handoff",
    ) -> None:
        from .validation import validate_intent_fields

        clean = validate_intent_fields(name, description, examples, threshold)
        object.__setattr__(self, "name", clean.name)
        object.__setattr__(self, "description", clean.description)
        object.__setattr__(self, "examples", clean.examples)
        object.__setattr__(self, "threshold", clean.threshold)
        object.__setattr__(self, "handoff", bool(handoff))
        object.__setattr__(self, "system_prompt", system_prompt or "")
        if on_low_confidence not in ("handoff", "clarify"):
            from .errors import ConfigError

            raise ConfigError(
                f"intent {self.name}: on_low_confidence must be 'handoff' or 'clarify'; got {on_low_confidence!r}"
            )
        object.__setattr__(self, "on_low_confidence", on_low_confidence)


@dataclass(frozen=True)
class IntentScore:
    name: str
    confidence: float


@dataclass(frozen=True)
class Classification:
    """Result of ``agent.classify(text)``.

    ``intent`` is ``None`` when no category fits (out of scope) or none are configured.
    """

    intent: str | None
    confidence: float
    runners_up: tuple[IntentScore, ...] = field(default_factory=tuple)

    def as_dict(self) -> dict[str, Any]:
        return {
            "intent": self.intent,
            "confidence": self.confidence,
            "runners_up": [{"intent": s.name, "confidence": s.confidence} for s in self.runners_up],
        }


class ThreadEvent:
    """What a user message did to the conversation's threads."""

    NEW_TOPIC = "NEW_TOPIC"
    FOLLOW_UP = "FOLLOW_UP"
    RETURN = "RETURN"
    RESOLUTION = "RESOLUTION"

    ALL = (NEW_TOPIC, FOLLOW_UP, RETURN, RESOLUTION)


class Usage(TypedDict):
    input_tokens: int
    output_tokens: int


class TurnResult(TypedDict, total=False):
    """What ``process_message`` returns (and the REST and WebSocket payloads carry)."""

    content: str
    message_id: str
    reply_id: str
    user_id: str
    session_id: str
    thread_id: str
    thread_event: str
    thread_confidence: float
    intent: str | None
    confidence: float
    runners_up: list[dict[str, Any]]
    escalated: bool
    offline: bool
    handled_by: str
    model: str
    usage: Usage
    latency_ms: float
    llm_latency_ms: float | None
    memories_used: list[dict[str, Any]]
    status: str
    error: str | None
