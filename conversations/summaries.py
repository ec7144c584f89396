"""Running summaries of long threads: what the LLM is told about messages outside its window."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .models import Message

if TYPE_CHECKING:
    from .selectors import HistoryMessage

FIRST_SENTENCE = re.compile(r"^(.{1,160}?[.!?])(\s|$)", re.DOTALL)


def gist(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    match = FIRST_SENTENCE.match(text)
    gist = match.group(1) if match else text
    return gist if len(gist) <= limit else gist[: limit - 1].rstrip() + "…"


def extractive_summary(messages: Sequence[Message | HistoryMessage], *, max_chars: int = 1200) -> str:
    """The gist of earlier messages, oldest first: what the user asked and what they were told.

    Extractive (first sentence of each message) so that it costs nothing and works offline. Reads
    each message's ``role`` and ``content`` only (a model instance or a row of them).
    """
    lines: list[str] = []
    for message in messages:
        if message.role == Message.Role.SYSTEM:
            continue
        who = {"user": "User", "assistant": "Assistant", "human_agent": "Human agent"}[message.role]
        lines.append(f"- {who}: {gist(message.content)}")
    summary = "\n".join(lines)
    if len(summary) <= max_chars:
        return summary
    # Keep the opening (the problem) and the most recent lines (where things stand).
    head, tail = lines[:2], list[str]()
    budget = max_chars - sum(len(line) + 1 for line in head) - 20
    for line in reversed(lines[2:]):
        if budget - len(line) - 1 < 0:
            break
        tail.insert(0, line)
        budget -= len(line) + 1
    return "\n".join([*head, "- …", *tail])
