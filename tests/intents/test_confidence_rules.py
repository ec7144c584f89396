"""Confidence rules: answer, hand off or clarify; and the LLM's intent decision below the threshold."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async

from agentflow import AgentFrameworkBuilder, ConfigError, IntentCategory
from agentflow.config import ConfidenceConfig
from agentflow.testing.fake_anthropic import FakeReply, ToolCall
from agentflow.types import Classification, IntentScore
from conversations.models import Escalation, Message
from intents.rules import ANSWER, CLARIFY, HANDOFF, clarifying_question, confidence_action

ORDERS = IntentCategory("ORDERS", "Order status and delivery", ["Where is my order?", "Track my parcel"])
RETURNS = IntentCategory("RETURNS", "Returns and refunds", ["I want to return this", "Refund request"])


async def _online_agent(client, *, orders_threshold: float | None = None):
    """ORDERS and RETURNS against the fake LLM; thread judgement off, so every LLM call is the intent's."""
    orders = IntentCategory("ORDERS", ORDERS.description, ORDERS.examples, threshold=orders_threshold)
    return await (
        AgentFrameworkBuilder()
        .with_intent_categories([orders, RETURNS])
        .with_config({"session_config": {"llm_thread_judgement": False}})
        .build(client)
    )


def _action(confidence: float, category: IntentCategory | None, event: str = "NEW_TOPIC", **config):
    classification = Classification(category.name if category else None, confidence, ())
    return confidence_action(
        classification=classification,
        category=category,
        config=ConfidenceConfig(**config),
        thread_event=event,
    )


def test_the_rules() -> None:
    clarify = IntentCategory("ORDERS", "Orders", ["x"], threshold=0.7, on_low_confidence="clarify")

    assert _action(0.9, ORDERS).action == ANSWER
    assert (_action(0.4, ORDERS).action, _action(0.4, ORDERS).threshold) == (HANDOFF, 0.5)
    assert _action(0.6, clarify).action == CLARIFY
    assert _action(0.99, IntentCategory("URGENT", "", ["x"], handoff=True)).action == HANDOFF
    assert _action(0.99, ORDERS, intent_specific={"ORDERS": 0.0}).action == HANDOFF  # 0.0: always a human
    assert _action(0.99, IntentCategory("ORDERS", "", ["x"], threshold=0.0)).action == HANDOFF
    assert _action(0.1, None).action == ANSWER  # out of scope goes to the LLM
    assert _action(0.1, ORDERS, event="RESOLUTION").action == ANSWER


def test_on_low_confidence_is_validated() -> None:
    with pytest.raises(ConfigError, match="on_low_confidence"):
        IntentCategory("ORDERS", "", ["x"], on_low_confidence="panic")


def test_clarifying_question_names_the_likely_intents() -> None:
    classification = Classification("ORDERS", 0.4, (IntentScore("RETURNS", 0.3), IntentScore("GONE", 0.1)))

    question = clarifying_question(classification, {"ORDERS": ORDERS, "RETURNS": RETURNS})

    assert question == (
        'I want to get this right: is your question about "Order status and delivery" or "Returns and refunds"?'
    )


@pytest.mark.django_db(transaction=True)
async def test_a_clarify_category_asks_instead_of_handing_off() -> None:
    orders = IntentCategory(
        "ORDERS", ORDERS.description, ORDERS.examples, threshold=1.0, on_low_confidence="clarify"
    )
    agent = await AgentFrameworkBuilder().with_intent_categories([orders, RETURNS]).build(None)

    result = await agent.process_message(user_id="c1", message="Where is my order? It has not arrived")

    assert (result["intent"], result["escalated"], result["handled_by"]) == ("ORDERS", False, "clarify")
    assert result["content"].startswith(
        '[Offline mode] I want to get this right: is your question about "Order'
    )
    assert await Escalation.objects.acount() == 0


@pytest.mark.django_db(transaction=True)
async def test_below_the_threshold_the_llm_decides_the_intent(anthropic_client, fake_llm) -> None:
    agent = await _online_agent(anthropic_client, orders_threshold=1.0)
    fake_llm.enqueue(
        FakeReply(tool_calls=[ToolCall("choose_intent", {"intent": "ORDERS", "confidence": 1.0})]),
        FakeReply(text="It ships tomorrow."),
    )

    result = await agent.process_message(user_id="j1", message="Where is my order? It has not arrived")

    assert (result["intent"], result["confidence"], result["escalated"]) == ("ORDERS", 1.0, False)
    assert result["content"] == "It ships tomorrow."
    judge = [r["body"] for r in fake_llm.requests if r["body"].get("tool_choice")]
    assert judge[0]["tool_choice"] == {"type": "tool", "name": "choose_intent"}
    assert judge[0]["tools"][0]["input_schema"]["properties"]["intent"]["enum"] == [
        "ORDERS",
        "RETURNS",
        "NONE",
    ]
    stored = await Message.objects.aget(pk=result["message_id"])
    assert stored.thread_signals["intent_source"] == "llm"


@pytest.mark.django_db(transaction=True)
async def test_an_llm_that_finds_no_fit_leaves_the_hand_off(anthropic_client, fake_llm) -> None:
    agent = await _online_agent(anthropic_client, orders_threshold=1.0)
    fake_llm.enqueue(FakeReply(tool_calls=[ToolCall("choose_intent", {"intent": "NONE", "confidence": 0.8})]))

    result = await agent.process_message(user_id="j2", message="Where is my order? It has not arrived")

    assert (result["intent"], result["escalated"], result["handled_by"]) == ("ORDERS", True, "handoff")
    assert len(fake_llm.requests) == 1  # the judgement only; no reply was generated
    assert await Escalation.objects.acount() == 1


@pytest.mark.django_db(transaction=True)
async def test_offline_the_classifier_decides_alone(fake_llm) -> None:
    orders = IntentCategory("ORDERS", ORDERS.description, ORDERS.examples, threshold=1.0)
    agent = await AgentFrameworkBuilder().with_intent_categories([orders, RETURNS]).build(None)

    result = await agent.process_message(user_id="j3", message="Where is my order? It has not arrived")

    assert (result["intent"], result["escalated"]) == ("ORDERS", True)
    assert fake_llm.requests == []


def test_reply_confidence_combines_its_signals() -> None:
    from intents.rules import reply_confidence, split_self_assessment

    assert split_self_assessment("Reset it from Settings.\n<confidence>0.3</confidence>") == (
        "Reset it from Settings.",
        0.3,
    )
    assert split_self_assessment("No tag here.") == ("No tag here.", None)
    assert reply_confidence(classification=0.8, self_assessment=None, retrieval=None) == (
        0.8,
        {"classification": 0.8},
    )
    score, parts = reply_confidence(classification=0.8, self_assessment=0.3, retrieval=None)
    assert (score, parts) == (0.6, {"classification": 0.8, "self_assessment": 0.3})
    boosted, _ = reply_confidence(classification=0.8, self_assessment=0.3, retrieval=0.8)
    assert boosted == round(0.6 + 0.4 * 0.25 * 0.8, 4)  # a memory only adds support


@pytest.mark.django_db(transaction=True)
async def test_a_weak_reply_is_withheld_and_a_human_takes_over(anthropic_client, fake_llm) -> None:
    agent = await _online_agent(anthropic_client, orders_threshold=0.7)  # like the seed's OUTAGE
    fake_llm.enqueue(FakeReply(text="Maybe it is lost?\n<confidence>0.05</confidence>"))

    result = await agent.process_message(user_id="weak", message="Where is my order? It has not arrived")

    assert (result["intent"], result["escalated"], result["handled_by"]) == ("ORDERS", True, "handoff")
    assert result["content"].startswith("I'm handing this conversation to a member of our team")
    assert result["reply_confidence"] < 0.7
    escalation = await Escalation.objects.aget()
    assert "withheld draft: Maybe it is lost?" in escalation.reason
    system = fake_llm.requests[0]["body"]["system"]
    assert "<confidence>X</confidence>" in (system if isinstance(system, str) else system[0]["text"])


@pytest.mark.django_db(transaction=True)
async def test_a_confident_reply_is_sent_without_its_tag(anthropic_client, fake_llm) -> None:
    agent = await _online_agent(anthropic_client)
    fake_llm.enqueue(FakeReply(text="It ships tomorrow.\n<confidence>0.95</confidence>"))
    streamed: list[str] = []

    async def collect(delta: str) -> None:
        streamed.append(delta)

    from agentflow import pipeline

    stored, _ = await sync_to_async(pipeline.accept)(
        agent, user_id="sure", message="Where is my order? It has not arrived"
    )
    result = await agent.run_turn(stored.pk, on_text=collect)

    assert (result["content"], result["escalated"]) == ("It ships tomorrow.", False)
    assert "".join(streamed) == "It ships tomorrow."
    assert result["reply_confidence"] > 0.9
    reply = await Message.objects.aget(reply_to_id=result["message_id"])
    assert reply.thread_signals["confidence"]["self_assessment"] == 0.95
