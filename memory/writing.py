"""What a resolved thread teaches: an extractive episodic memory (problem, what helped, outcome)."""

from __future__ import annotations

from conversations.models import Message, Thread
from conversations.summaries import _gist


def resolution_memory_text(*, thread: Thread, messages: list[Message]) -> str:
    """The problem (the opening message), what helped (the last answer before the resolution) and
    the outcome, in the user's and the agent's own words: it costs nothing and works offline."""
    answers = [m for m in messages if m.role in (Message.Role.ASSISTANT, Message.Role.HUMAN_AGENT)]
    helped = _gist(answers[-1].content, 240) if answers else "(no answer recorded)"
    outcome = _gist(thread.resolution, 160) if thread.resolution else "resolved"
    return f"Problem: {_gist(thread.topic, 200)} What helped: {helped} Outcome: {outcome}"
