"""Long threads: the LLM gets the last messages verbatim and a running summary of the earlier ones."""

from __future__ import annotations

import pytest

from agentflow import AgentFrameworkBuilder
from conversations.models import Message
from conversations.summaries import extractive_summary

pytestmark = pytest.mark.django_db(transaction=True)

SCRIPT = [
    "My login is broken. It started this morning after the update.",
    "It says invalid password when I try to sign in",
    "I reset the password twice already and the login still fails",
    "Is the sign-in service down for everyone?",
]


async def test_a_long_thread_sends_a_window_and_a_summary(anthropic_client, fake_llm) -> None:
    agent = await (
        AgentFrameworkBuilder()
        .with_intent_categories([])
        .with_config({"llm_config": {"history_messages": 2}})
        .build(anthropic_client)
    )
    results = [await agent.process_message(user_id="long", message=text) for text in SCRIPT]

    assert len({r["thread_id"] for r in results}) == 1, [r["thread_event"] for r in results]
    last = fake_llm.requests[-1]["body"]
    # The window: the two messages before the current one (a user message and its reply), then it.
    assert [m["role"] for m in last["messages"]] == ["user", "assistant", "user"]
    assert last["messages"][0]["content"] == SCRIPT[2]
    assert last["messages"][-1]["content"] == SCRIPT[3]
    system = last["system"] if isinstance(last["system"], str) else last["system"][0]["text"]
    assert "Earlier in this conversation thread (summary):" in system
    assert "- User: My login is broken." in system
    assert f"- User: {SCRIPT[1]}" in system
    first_request = fake_llm.requests[0]["body"]
    first_system = (
        first_request["system"]
        if isinstance(first_request["system"], str)
        else first_request["system"][0]["text"]
    )
    assert "summary" not in first_system


def test_extractive_summary_keeps_the_opening_and_the_latest_lines() -> None:
    messages = [
        Message(role="user", content=f"Message number {i}. More detail follows here.") for i in range(60)
    ]

    summary = extractive_summary(messages, max_chars=300)

    lines = summary.splitlines()
    assert lines[:2] == ["- User: Message number 0.", "- User: Message number 1."]
    assert lines[2] == "- …"
    assert lines[-1] == "- User: Message number 59."
    assert len(summary) <= 300
