"""What a conversation teaches: resolved threads (problem, what helped, outcome) and stated preferences."""

from __future__ import annotations

import re

from conversations.models import Message, Thread
from conversations.summaries import _gist


def resolution_memory_text(*, thread: Thread, messages: list[Message]) -> str:
    """The problem (the opening message), what helped (the last answer before the resolution) and
    the outcome, in the user's and the agent's own words: it costs nothing and works offline."""
    answers = [m for m in messages if m.role in (Message.Role.ASSISTANT, Message.Role.HUMAN_AGENT)]
    helped = _gist(answers[-1].content, 240) if answers else "(no answer recorded)"
    outcome = _gist(thread.resolution, 160) if thread.resolution else "resolved"
    return f"Problem: {_gist(thread.topic, 200)} What helped: {helped} Outcome: {outcome}"


PREFERENCE = re.compile(
    r"\b((please\s+)?(email|e-mail|call|text|phone|message|contact|reach) me\b"
    r"|(don'?t|do not|never|please don'?t) (call|email|e-mail|text|phone|contact)\b"
    r"|i(?:'d| would)? prefer\b|my preferred\b|i(?:'d| would) rather\b)",
    re.IGNORECASE,
)


def preference_statement(text: str) -> str | None:
    """The sentences of a message that state a preference, or None."""
    sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", text) if s.strip()]
    stated = [s for s in sentences if PREFERENCE.search(s)]
    return " ".join(stated)[:500] if stated else None
