"""The seed README's examples, as written, against the fake Messages API (driven by the real SDK)."""

from __future__ import annotations

import json
import logging
from datetime import timedelta

import pytest
from fastmcp import Client, FastMCP

from agentflow import AgentFrameworkBuilder, IntentCategory, Middleware
from agentflow.agent import HANDOFF_NOTICE
from agentflow.config import DEFAULT_SYSTEM_PROMPT
from agentflow.testing.fake_anthropic import FakeReply, estimate_tokens
from conversations.models import ChatSession, EndUser, Message, Thread

pytestmark = pytest.mark.django_db(transaction=True)

# --- Quick Start -----------------------------------------------------------------------------

categories = [
    IntentCategory("GREETING", "Friendly greetings", ["hello", "hi", "hey"]),
    IntentCategory("QUESTION", "User questions", ["how do I", "what is", "help me"]),
    IntentCategory("GOODBYE", "Conversation endings", ["bye", "goodbye", "thanks"]),
]

PASSWORD_REPLY = "Go to Settings > Security and choose 'Reset password'; we email you a link."


async def create_agent(llm_client):
    agent = await AgentFrameworkBuilder().with_intent_categories(categories).with_logging().build(llm_client)
    return agent


def fake_input_tokens(body: dict) -> int:
    """What the fake server reports as input tokens for a request body (see its module docstring)."""
    prompt = {k: body.get(k) for k in ("system", "messages", "tools")}
    return estimate_tokens(json.dumps(prompt, sort_keys=True, default=str))


async def test_quick_start_answers_through_the_llm(anthropic_client, fake_llm, caplog):
    fake_llm.enqueue(FakeReply(text=PASSWORD_REPLY))
    agent = await create_agent(anthropic_client)

    with caplog.at_level(logging.INFO, logger="agentflow"):
        response = await agent.process_message(
            user_id="user123", message="Hello! How do I reset my password?"
        )

    assert response["content"] == PASSWORD_REPLY
    assert response["status"] == "done"
    assert response["user_id"] == "user123"
    assert response["thread_event"] == "NEW_TOPIC"
    assert response["intent"] == "QUESTION"
    assert 0.0 <= response["confidence"] <= 1.0
    # Not escalated means the classifier cleared the default threshold (0.5).
    assert response["confidence"] >= agent.config.confidence_config.default_threshold
    assert response["escalated"] is False
    assert response["offline"] is False
    assert response["handled_by"] == "llm"
    assert response["memories_used"] == []

    assert len(fake_llm.requests) == 1
    request = fake_llm.requests[0]
    body = request["body"]
    assert request["path"] == "/v1/messages"
    assert "test-key" in request["headers"].get("x-api-key", "") + request["headers"].get("authorization", "")
    assert body["model"] == agent.config.llm_config.model == response["model"]
    assert body["max_tokens"] == agent.config.llm_config.max_tokens
    assert body["temperature"] == agent.config.llm_config.temperature
    assert body["system"].startswith(DEFAULT_SYSTEM_PROMPT)
    assert "classified as QUESTION" in body["system"]
    assert body["messages"] == [{"role": "user", "content": "Hello! How do I reset my password?"}]
    assert "tools" not in body
    assert "stream" not in body

    # Usage is what the fake server reported for this very request.
    assert response["usage"] == {
        "input_tokens": fake_input_tokens(body),
        "output_tokens": estimate_tokens(PASSWORD_REPLY),
    }
    assert response["usage"]["input_tokens"] > 0 and response["usage"]["output_tokens"] > 0

    # Everything is in PostgreSQL, under the user's own session and thread.
    user = await EndUser.objects.aget(external_id="user123")
    session = await ChatSession.objects.aget(pk=response["session_id"])
    thread = await Thread.objects.aget(pk=response["thread_id"])
    assert session.user_id == user.pk and thread.user_id == user.pk and thread.session_id == session.pk
    assert thread.status == Thread.Status.OPEN
    assert thread.intent == "QUESTION"
    assert thread.topic == "Hello! How do I reset my password?"
    stored = await Message.objects.aget(pk=response["message_id"])
    reply = await Message.objects.aget(pk=response["reply_id"])
    assert (stored.role, stored.status, stored.thread_id) == ("user", "done", thread.pk)
    assert (reply.role, reply.content, reply.reply_to_id) == ("assistant", PASSWORD_REPLY, stored.pk)
    assert reply.usage == response["usage"]

    # with_logging() logs each turn.
    turn_logs = [r.getMessage() for r in caplog.records if r.name == "agentflow.turn"]
    assert len(turn_logs) == 1
    assert (
        "user=user123" in turn_logs[0]
        and "event=NEW_TOPIC" in turn_logs[0]
        and "intent=QUESTION" in turn_logs[0]
    )


async def test_follow_up_sends_the_thread_history(anthropic_client, fake_llm):
    fake_llm.enqueue(FakeReply(text=PASSWORD_REPLY), FakeReply(text="Click the link in the email."))
    agent = await create_agent(anthropic_client)

    first = await agent.process_message(user_id="user123", message="Hello! How do I reset my password?")
    second = await agent.process_message(user_id="user123", message="How do I reset it?")

    assert second["thread_event"] == "FOLLOW_UP"
    assert second["thread_id"] == first["thread_id"]
    assert second["session_id"] == first["session_id"]
    assert second["content"] == "Click the link in the email."
    assert second["escalated"] is False
    assert len(fake_llm.requests) == 2
    assert fake_llm.requests[1]["body"]["messages"] == [
        {"role": "user", "content": "Hello! How do I reset my password?"},
        {"role": "assistant", "content": PASSWORD_REPLY},
        {"role": "user", "content": "How do I reset it?"},
    ]
    assert await Thread.objects.filter(user__external_id="user123").acount() == 1
    assert await Message.objects.filter(thread_id=first["thread_id"]).acount() == 4


async def test_users_never_see_each_others_history(anthropic_client, fake_llm):
    agent = await create_agent(anthropic_client)

    alice = await agent.process_message(user_id="alice", message="Hello! How do I reset my password?")
    bob = await agent.process_message(user_id="bob", message="How do I reset it?")

    assert bob["thread_event"] == "NEW_TOPIC"
    assert bob["session_id"] != alice["session_id"] and bob["thread_id"] != alice["thread_id"]
    assert fake_llm.requests[1]["body"]["messages"] == [{"role": "user", "content": "How do I reset it?"}]


# --- Support Agent ---------------------------------------------------------------------------

support_categories = [
    IntentCategory("QUERY", "General questions", ["How do I...", "What is..."]),
    IntentCategory("OUTAGE", "Production issues", ["Service is down", "Error 500"]),
    IntentCategory("ESCALATION", "Urgent issues", ["Critical", "Production down"]),
]


def support_mcp_client() -> Client:
    server = FastMCP("support-tools")

    @server.tool
    def service_status(service: str) -> str:
        """Current status of a service."""
        return f"{service}: degraded"

    return Client(server)


async def test_support_agent_escalates_escalation_intent_without_the_llm(anthropic_client, fake_llm):
    llm_client, fastmcp_client = anthropic_client, support_mcp_client()

    agent = await (
        AgentFrameworkBuilder()
        .with_intent_categories(support_categories)
        .with_confidence_thresholds(
            {
                "QUERY": 0.5,
                "OUTAGE": 0.7,  # Higher confidence needed
                "ESCALATION": 0.0,  # Always escalate to humans
            }
        )
        .build(llm_client, fastmcp_client)
    )

    assert agent.config.confidence_config.intent_specific == {"QUERY": 0.5, "OUTAGE": 0.7, "ESCALATION": 0.0}
    response = await agent.process_message(user_id="ops-1", message="Critical: production down!")

    assert response["intent"] == "ESCALATION"
    assert response["escalated"] is True
    assert response["handled_by"] == "handoff"
    assert response["content"] == HANDOFF_NOTICE
    assert response["offline"] is False
    assert response["usage"] == {"input_tokens": 0, "output_tokens": 0}
    assert fake_llm.requests == []
    thread = await Thread.objects.aget(pk=response["thread_id"])
    assert thread.escalated is True
    assert await Message.objects.filter(pk=response["message_id"], escalated=True).aexists()


async def test_support_agent_answers_outage_with_tools_offered(anthropic_client, fake_llm):
    fake_llm.enqueue(FakeReply(text="We are looking into it."))
    agent = await (
        AgentFrameworkBuilder()
        .with_intent_categories(support_categories)
        .with_confidence_thresholds({"QUERY": 0.5, "OUTAGE": 0.7, "ESCALATION": 0.0})
        .build(anthropic_client, support_mcp_client())
    )

    response = await agent.process_message(user_id="ops-2", message="I get Error 500 on every page")

    assert response["intent"] == "OUTAGE"
    assert response["confidence"] >= 0.7
    assert response["escalated"] is False
    assert response["content"] == "We are looking into it."
    tools = fake_llm.requests[0]["body"]["tools"]
    assert [t["name"] for t in tools] == ["service_status"]
    assert tools[0]["description"] == "Current status of a service."
    assert tools[0]["input_schema"]["properties"] == {"service": {"type": "string"}}


# --- E-commerce Assistant --------------------------------------------------------------------

ecommerce_categories = [
    IntentCategory("PRODUCT_SEARCH", "Finding products", ["Show me...", "Do you have..."]),
    IntentCategory("ORDER_STATUS", "Order tracking", ["Where is my order", "Delivery"]),
    IntentCategory("RETURNS", "Returns & refunds", ["Return this", "Refund request"]),
]


class PersonalizationMiddleware(Middleware):
    async def before_turn(self, ctx):
        ctx.system_additions.append(f"Customer {ctx.user_id} usually buys running gear.")


class InventoryMiddleware(Middleware):
    async def before_turn(self, ctx):
        ctx.metadata["stock_checked"] = True
        ctx.system_additions.append("Stock levels: all items available.")


async def test_ecommerce_assistant_middleware_enriches_the_prompt(anthropic_client, fake_llm):
    llm_client = anthropic_client
    agent = await (
        AgentFrameworkBuilder()
        .with_intent_categories(ecommerce_categories)
        .with_middleware(
            [
                PersonalizationMiddleware(),  # Recommend based on history
                InventoryMiddleware(),  # Check stock levels
            ]
        )
        .build(llm_client)
    )

    response = await agent.process_message(user_id="shopper-7", message="Where is my order A-1001?")

    assert response["intent"] == "ORDER_STATUS"
    assert response["content"] == "Echo: Where is my order A-1001?"
    system = fake_llm.requests[0]["body"]["system"]
    personal = system.index("Customer shopper-7 usually buys running gear.")
    stock = system.index("Stock levels: all items available.")
    assert personal < stock  # middleware runs in the order given


# --- Personal Assistant ----------------------------------------------------------------------

personal_categories = [
    IntentCategory("SCHEDULE", "Calendar management", ["Schedule meeting", "Free time"]),
    IntentCategory("EMAIL", "Email tasks", ["Send email", "Check inbox"]),
    IntentCategory("TASKS", "Task management", ["Add to todo", "My tasks"]),
]


async def test_personal_assistant_config_reaches_sessions(anthropic_client, fake_llm):
    llm_client, fastmcp_client = anthropic_client, support_mcp_client()
    agent = await (
        AgentFrameworkBuilder()
        .with_intent_categories(personal_categories)
        .with_config(
            {
                "session_config": {"ttl_seconds": 14400},  # 4 hour sessions
                "memory_config": {"max_episodic_per_user": 500},  # Remember more
            }
        )
        .build(llm_client, fastmcp_client)
    )

    assert agent.config.session_config.ttl_seconds == 14400
    assert agent.config.memory_config.max_episodic_per_user == 500
    # Sections given only in part keep their other defaults.
    assert agent.config.session_config.thread_inactivity_threshold == 30
    assert agent.config.memory_config.similarity_threshold == 0.6

    response = await agent.process_message(user_id="exec-1", message="Schedule a meeting with Bob tomorrow")

    assert response["intent"] == "SCHEDULE"
    session = await ChatSession.objects.aget(pk=response["session_id"])
    assert session.ttl_seconds == 14400
    assert session.expires_at - session.last_activity_at == timedelta(hours=4)
