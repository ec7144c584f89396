"""The LLM places a message when the thread scorer is unsure; never offline; the scorer stands on failure."""

from __future__ import annotations

import pytest

from agentflow import AgentFrameworkBuilder
from agentflow.testing.fake_anthropic import FakeReply, ToolCall
from conversations.models import Message, Thread

pytestmark = pytest.mark.django_db(transaction=True)

FIRST = "My login is broken"
SECOND = "It says invalid password when I try"


async def _agent(client, **session):
    # judgement_margin 0.5: every scorer decision counts as unsure, so the LLM is always asked.
    config = {"session_config": {"judgement_margin": 0.5, **session}}
    return await AgentFrameworkBuilder().with_intent_categories([]).with_config(config).build(client)


def _judge_requests(fake) -> list[dict]:
    return [r["body"] for r in fake.requests if r["body"] and r["body"].get("tool_choice")]


async def test_the_llm_verdict_places_an_unsure_message(anthropic_client, fake_llm) -> None:
    agent = await _agent(anthropic_client)
    first = await agent.process_message(user_id="judged", message=FIRST)
    fake_llm.enqueue(
        FakeReply(tool_calls=[ToolCall("place_message", {"event": "NEW_TOPIC", "confidence": 0.9})]),
        FakeReply(text="Let us look at that."),
    )

    second = await agent.process_message(user_id="judged", message=SECOND)

    assert second["thread_event"] == "NEW_TOPIC"
    assert second["thread_id"] != first["thread_id"]
    assert second["thread_confidence"] == 0.9
    assert second["content"] == "Let us look at that."
    judge = _judge_requests(fake_llm)
    assert len(judge) == 1
    assert judge[0]["tool_choice"] == {"type": "tool", "name": "place_message"}
    assert "T1: 'My login is broken' (open, the active thread)" in judge[0]["messages"][0]["content"]
    stored = await Message.objects.aget(pk=second["message_id"])
    assert stored.thread_signals["reason"] == "LLM judgement"
    assert stored.thread_signals["scorer_decision"] == {"event": "FOLLOW_UP", "thread_id": first["thread_id"]}
    assert await Thread.objects.filter(user__external_id="judged").acount() == 2


async def test_an_off_script_verdict_leaves_the_scorer_decision(anthropic_client, fake_llm) -> None:
    agent = await _agent(anthropic_client)
    first = await agent.process_message(user_id="judged", message=FIRST)
    fake_llm.enqueue(
        FakeReply(tool_calls=[ToolCall("place_message", {"event": "RETURN", "thread": "T9"})]),
        FakeReply(text="ok"),
    )

    second = await agent.process_message(user_id="judged", message=SECOND)

    assert (second["thread_event"], second["thread_id"]) == ("FOLLOW_UP", first["thread_id"])
    stored = await Message.objects.aget(pk=second["message_id"])
    assert stored.thread_signals["llm_judgement"] == "unavailable"


async def test_an_llm_error_leaves_the_scorer_decision(anthropic_client, fake_llm) -> None:
    agent = await _agent(anthropic_client)
    first = await agent.process_message(user_id="judged", message=FIRST)
    fake_llm.enqueue_error(400, "invalid_request_error", "bad tool", times=1)
    fake_llm.enqueue(FakeReply(text="Still here."))

    second = await agent.process_message(user_id="judged", message=SECOND)

    assert (second["thread_event"], second["thread_id"], second["content"]) == (
        "FOLLOW_UP",
        first["thread_id"],
        "Still here.",
    )


async def test_no_judgement_offline_or_when_turned_off(anthropic_client, fake_llm) -> None:
    offline = await _agent(None)
    await offline.process_message(user_id="off", message=FIRST)
    await offline.process_message(user_id="off", message=SECOND)
    turned_off = await _agent(anthropic_client, llm_thread_judgement=False)
    await turned_off.process_message(user_id="on", message=FIRST)
    await turned_off.process_message(user_id="on", message=SECOND)

    assert _judge_requests(fake_llm) == []
    assert len(fake_llm.requests) == 2  # the two replies of the online agent, no judgement
