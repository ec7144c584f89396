"""What a conversation teaches: resolved threads (problem, what helped, outcome) and stated preferences."""

from __future__ import annotations

import re
from typing import Any

from conversations.models import Message, Thread
from conversations.summaries import gist

# Replies that say nothing about the problem: the offline notice, the hand-off notice, the LLM-outage
# fallback. They are never "what helped".
NOT_AN_ANSWER = frozenset({"offline", "handoff", "fallback"})


def answers_of(messages: list[Message]) -> list[Message]:
    """The agent's and staff's real answers in a thread (notices left out), oldest first."""
    return [
        m
        for m in messages
        if m.role in (Message.Role.ASSISTANT, Message.Role.HUMAN_AGENT) and m.handled_by not in NOT_AN_ANSWER
    ]


def resolution_memory_text(*, thread: Thread, messages: list[Message]) -> str:
    """The problem (the opening message), what helped (the last answer before the resolution) and
    the outcome, in the user's and the agent's own words: it costs nothing and works offline."""
    answers = answers_of(messages)
    helped = gist(answers[-1].content, 240) if answers else "(no answer recorded)"
    outcome = gist(thread.resolution, 160) if thread.resolution else "resolved"
    return f"Problem: {gist(thread.topic, 200)} What helped: {helped} Outcome: {outcome}"


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


def session_memory_text(*, thread: Thread, messages: list[Message]) -> str:
    """What an unresolved thread of an ended session tried, in the conversation's own words."""
    answers = answers_of(messages)
    tried = gist(answers[-1].content, 240) if answers else "(no answer recorded)"
    return f"Problem: {gist(thread.topic, 200)} What was tried: {tried} Outcome: unresolved when the session ended."


def had_real_exchange(messages: list[Message]) -> bool:
    """A user message answered by the agent or a human: worth remembering (a lone "hi" is not)."""
    roles = {m.role for m in messages}
    return Message.Role.USER in roles and bool(roles & {Message.Role.ASSISTANT, Message.Role.HUMAN_AGENT})


SUMMARY_SYSTEM = (
    "You write a memory of a support conversation for the assistant's future use. Answer with exactly "
    "three short sentences, at most 400 characters in all, in this form: "
    "'Problem: <the user's problem> What worked: <what helped, or what was tried> Outcome: <the outcome>'. "
    "Keep concrete product details; add nothing that is not in the conversation."
)
SUMMARY_MAX_CHARS = 600


async def llm_memory_summary(
    *, llm: Any, config: Any, thread: Thread, messages: list[Message], ended: str
) -> str | None:
    """Ask the LLM for a "Problem / What worked / Outcome" summary of a thread.

    Args:
        llm: the agent's ``LLMBackend``; config: its ``llm_config`` (a short, deterministic call is made).
        ended: how the thread ended ("resolved: <resolution>" or "unresolved when the session ended").

    Returns:
        The summary on one line, or None if the reply is empty or lacks the three parts.

    Raises:
        LLMError: the caller falls back to the extractive text.
    """
    lines = [f"{m.role}: {gist(m.content, 400)}" for m in messages[-20:]]
    prompt = f"Topic: {thread.topic}\nHow it ended: {ended}\n\nConversation:\n" + "\n".join(lines)
    reply = await llm.generate(
        system=SUMMARY_SYSTEM,
        messages=[{"role": "user", "content": prompt}],
        config=config.model_copy(update={"max_tokens": 200, "temperature": 0.0, "max_retries": 1}),
    )
    text = " ".join(reply.text.split())
    if not all(part in text for part in ("Problem:", "Outcome:")):
        return None
    return text[:SUMMARY_MAX_CHARS]
