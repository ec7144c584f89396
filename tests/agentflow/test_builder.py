"""AgentFrameworkBuilder and the agent it builds: input errors, offline mode, handlers, middleware,
tools (an in-process MCP server), LLM errors, streaming, classification and idempotent turns."""

from __future__ import annotations

import logging

import anthropic
import pytest
from anthropic import AsyncAnthropic
from asgiref.sync import sync_to_async
from fastmcp import Client, FastMCP

from agentflow import (
    AgentFrameworkBuilder,
    Classification,
    ConfigError,
    HandlerResult,
    IntentCategory,
    InvalidInput,
    LLMError,
    Middleware,
    RateLimited,
    pipeline,
)
from agentflow.agent import HANDOFF_NOTICE, NO_ANSWER_NOTICE, OFFLINE_PREFIX
from agentflow.degrade import OFFLINE_REASON
from agentflow.llm import OFFLINE_NOTICE
from agentflow.testing.fake_anthropic import FakeReply, ToolCall
from conversations.models import EndUser, Escalation, Message, Thread
from intents.models import IntentCategory as IntentCategoryRow

SHOP = [
    IntentCategory(
        "PRODUCT_SEARCH", "Finding products", ["Show me running shoes", "Do you have this in blue?"]
    ),
    IntentCategory("ORDER_STATUS", "Order tracking", ["Where is my order", "Delivery"]),
    IntentCategory("RETURNS", "Returns & refunds", ["Return this", "Refund request"]),
]
ORDER_QUESTION = "Where is my order A-1001?"
REFUND_QUESTION = "I want a refund for these shoes"

db = pytest.mark.django_db(transaction=True)


def shop_builder() -> AgentFrameworkBuilder:
    return AgentFrameworkBuilder().with_intent_categories(SHOP)


async def ready(result: dict) -> Message:
    return await Message.objects.aget(pk=result["message_id"])


# --- builder input errors --------------------------------------------------------------------


@pytest.mark.parametrize("value", ["GREETING", b"GREETING", {"GREETING": "hi"}, None, 42, SHOP[0]])
def test_categories_must_be_a_list(value):
    with pytest.raises(ConfigError, match="takes a list of IntentCategory"):
        AgentFrameworkBuilder().with_intent_categories(value)


@pytest.mark.parametrize(("item", "type_name"), [("GREETING", "str"), ({"name": "GREETING"}, "dict")])
def test_category_items_must_be_intent_categories(item, type_name):
    with pytest.raises(ConfigError, match=f"got {type_name}"):
        AgentFrameworkBuilder().with_intent_categories([SHOP[0], item])


def test_duplicate_category_names():
    with pytest.raises(ConfigError, match="intent category ORDER_STATUS is defined twice"):
        AgentFrameworkBuilder().with_intent_categories([*SHOP, IntentCategory("ORDER_STATUS", "again")])


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "bad name!"}, "intent name must be"),
        ({"name": ""}, "intent name must be"),
        ({"name": "X" * 101}, "intent name must be"),
        ({"name": "A", "examples": "hello"}, "examples must be a list of strings"),
        ({"name": "A", "examples": ["ok", "  "]}, "every example must be a non-empty string"),
        ({"name": "A", "threshold": 1.5}, "threshold must be from 0 to 1"),
        ({"name": "A", "threshold": -0.1}, "threshold must be from 0 to 1"),
        ({"name": "A", "threshold": True}, "threshold must be a number"),
        ({"name": "A", "description": 5}, "description must be a string"),
    ],
)
def test_intent_category_validates_its_fields(kwargs, fragment):
    with pytest.raises(ConfigError, match=fragment):
        IntentCategory(**kwargs)


def test_intent_category_cleans_its_fields():
    category = IntentCategory(
        "ORDER_STATUS", "  Order tracking ", [" Where is my order ", "Delivery"], threshold=1
    )

    assert category.description == "Order tracking"
    assert category.examples == ("Where is my order", "Delivery")
    assert category.threshold == 1.0 and isinstance(category.threshold, float)
    with pytest.raises(AttributeError):
        category.name = "OTHER"


@pytest.mark.parametrize(
    "thresholds", [{"RETURNS": 1.5}, {"RETURNS": -1}, {"RETURNS": "high"}, {"RETURNS": True}]
)
def test_threshold_values_are_checked_at_once(thresholds):
    with pytest.raises(ConfigError, match="RETURNS"):
        shop_builder().with_confidence_thresholds(thresholds)


def test_thresholds_must_be_a_mapping():
    with pytest.raises(ConfigError, match="takes a mapping"):
        shop_builder().with_confidence_thresholds([("RETURNS", 0.5)])


@db
async def test_threshold_for_unknown_intent_fails_the_build_and_records_nothing(anthropic_client):
    builder = shop_builder().with_confidence_thresholds({"RETURNS": 0.6, "REFUNDS": 0.5})

    with pytest.raises(ConfigError) as info:
        await builder.build(anthropic_client)

    assert (
        str(info.value)
        == "'REFUNDS' names no intent category of agent 'agentflow'; known: ORDER_STATUS, PRODUCT_SEARCH, RETURNS"
    )
    assert await IntentCategoryRow.objects.acount() == 0


@db
async def test_handler_for_unknown_intent_fails_the_build(anthropic_client):
    async def refunds(ctx):
        return "no"

    with pytest.raises(ConfigError, match="'REFUNDS' names no intent category"):
        await shop_builder().with_handlers({"REFUNDS": refunds}).build(anthropic_client)
    assert await IntentCategoryRow.objects.acount() == 0


def test_handlers_must_be_async():
    def sync_handler(ctx):
        return "hi"

    with pytest.raises(ConfigError, match="handler for 'RETURNS' must be an async function"):
        shop_builder().with_handlers({"RETURNS": sync_handler})
    with pytest.raises(ConfigError, match="handler for 'RETURNS' is not callable"):
        shop_builder().with_handlers({"RETURNS": "refund desk"})
    with pytest.raises(ConfigError, match="takes a mapping"):
        shop_builder().with_handlers([sync_handler])


def test_async_callable_objects_are_handlers():
    class Desk:
        async def __call__(self, ctx):
            return "desk"

    shop_builder().with_handlers({"RETURNS": Desk()})


def test_middleware_needs_async_hooks():
    class NoHooks:
        pass

    class SyncHook:
        def before_turn(self, ctx):
            pass

    with pytest.raises(ConfigError, match="NoHooks has neither before_turn nor after_turn"):
        shop_builder().with_middleware([NoHooks()])
    with pytest.raises(ConfigError, match=r"SyncHook\.before_turn must be an async method"):
        shop_builder().with_middleware([SyncHook()])


def test_with_logging_levels(request):
    logger = logging.getLogger("agentflow")
    request.addfinalizer(lambda level=logger.level: logger.setLevel(level))

    with pytest.raises(ConfigError, match="with_logging level must be"):
        shop_builder().with_logging("LOUD")
    with pytest.raises(ConfigError, match="with_logging level must be"):
        shop_builder().with_logging(5)
    assert shop_builder().with_logging("debug")._log_level == "DEBUG"
    assert shop_builder().with_logging(logging.WARNING)._log_level == "WARNING"


@db
async def test_with_logging_sets_the_agentflow_logger_level(request):
    logger = logging.getLogger("agentflow")
    request.addfinalizer(lambda level=logger.level: logger.setLevel(level))

    await shop_builder().with_logging("WARNING").build(None)

    assert logger.level == logging.WARNING


@db
async def test_sync_anthropic_client_is_rejected():
    with pytest.raises(ConfigError, match=r"needs an anthropic\.AsyncAnthropic client"):
        await shop_builder().build(anthropic.Anthropic(api_key="test-key"))


@db
async def test_other_llm_and_mcp_clients_are_rejected(anthropic_client):
    with pytest.raises(ConfigError, match="got object"):
        await shop_builder().build(object())
    with pytest.raises(ConfigError, match="as mcp_client; got str"):
        await shop_builder().build(anthropic_client, "http://mcp.example.com")


@db
async def test_built_agent_does_not_change_with_its_builder(anthropic_client):
    async def first(ctx):
        return "first"

    async def second(ctx):
        return "second"

    builder = shop_builder().with_handlers({"RETURNS": first})
    agent = await builder.build(anthropic_client)
    builder.with_handlers({"RETURNS": second, "ORDER_STATUS": second})

    assert dict(agent.handlers) == {"RETURNS": first}
    with pytest.raises(TypeError):
        agent.handlers["ORDER_STATUS"] = second
    # Building records the code's categories for the admin.
    names = [name async for name in IntentCategoryRow.objects.values_list("name", flat=True)]
    assert names == ["ORDER_STATUS", "PRODUCT_SEARCH", "RETURNS"]


# --- offline mode ----------------------------------------------------------------------------


@db
async def test_offline_without_a_client(fake_llm):
    agent = await shop_builder().build(None)
    assert agent.offline is True

    first = await agent.process_message(user_id="u-off", message=ORDER_QUESTION)
    second = await agent.process_message(user_id="u-off", message="It was supposed to arrive on Monday")

    assert first["content"] == OFFLINE_NOTICE
    assert first["content"].startswith("[Offline mode]")
    assert first["offline"] is True and first["handled_by"] == "offline" and first["model"] == "offline"
    # The notice promises that staff pick the message up: the escalation is opened (issue 11).
    assert first["escalated"] is True
    escalation = await Escalation.objects.aget(thread_id=first["thread_id"])
    assert (escalation.status, escalation.reason) == ("open", OFFLINE_REASON)
    assert first["thread_event"] == "NEW_TOPIC" and first["intent"] == "ORDER_STATUS"
    # The thread now waits for a human: the bot stays silent rather than repeat the notice.
    assert second["thread_event"] == "FOLLOW_UP" and second["thread_id"] == first["thread_id"]
    assert (second["status"], second["handled_by"], second["content"]) == ("done", "human", None)
    assert await Escalation.objects.acount() == 1
    assert fake_llm.requests == []


@db
async def test_offline_with_a_keyless_client_sends_nothing(fake_llm, monkeypatch):
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_AUTH_TOKEN", raising=False)
    keyless = AsyncAnthropic(base_url=fake_llm.base_url)

    async def returns(ctx):
        return "Returns are free within 30 days."

    agent = await (
        shop_builder()
        .with_handlers({"RETURNS": returns})
        .with_confidence_thresholds({"PRODUCT_SEARCH": 0.0})
        .build(keyless)
    )
    assert agent.offline is True

    # Separate users: an offline LLM reply escalates its thread, and a held thread gets no bot reply.
    by_llm = await agent.process_message(user_id="u-keyless-1", message=ORDER_QUESTION)
    by_handler = await agent.process_message(user_id="u-keyless-2", message=REFUND_QUESTION)
    by_human = await agent.process_message(user_id="u-keyless-3", message="Show me running shoes in size 10")

    assert by_llm["content"] == OFFLINE_NOTICE and by_llm["offline"] is True
    assert by_llm["escalated"] is True
    assert by_llm["llm_latency_ms"] is None  # no model ran: no latency sample for the dashboard
    assert by_handler["content"] == OFFLINE_PREFIX + "Returns are free within 30 days."
    assert by_handler["handled_by"] == "handler:RETURNS" and by_handler["offline"] is True
    assert by_human["content"] == OFFLINE_PREFIX + HANDOFF_NOTICE and by_human["escalated"] is True
    assert fake_llm.requests == []


# --- handlers --------------------------------------------------------------------------------


@db
async def test_handler_string_answers_without_the_llm(anthropic_client, fake_llm):
    seen = []

    async def order_status(ctx):
        seen.append(ctx)
        return f"Order A-1001 for {ctx.user_id} shipped yesterday."

    agent = await shop_builder().with_handlers({"ORDER_STATUS": order_status}).build(anthropic_client)
    result = await agent.process_message(user_id="u-h1", message=ORDER_QUESTION)

    assert result["content"] == "Order A-1001 for u-h1 shipped yesterday."
    assert result["handled_by"] == "handler:ORDER_STATUS"
    assert result["offline"] is False and result["escalated"] is False
    assert fake_llm.requests == []
    (ctx,) = seen
    assert (ctx.message, ctx.intent, ctx.thread_event) == (ORDER_QUESTION, "ORDER_STATUS", "NEW_TOPIC")
    assert (ctx.thread_id, ctx.session_id, ctx.message_id) == (
        result["thread_id"],
        result["session_id"],
        result["message_id"],
    )
    assert ctx.confidence == result["confidence"]
    reply = await Message.objects.aget(pk=result["reply_id"])
    assert (reply.content, reply.handled_by) == (result["content"], "handler:ORDER_STATUS")


@db
async def test_handler_system_addition_reaches_the_llm(anthropic_client, fake_llm):
    fake_llm.enqueue(FakeReply(text="It shipped on Monday."))

    async def order_status(ctx):
        return HandlerResult(system_addition="Order A-1001: shipped Monday via UPS.")

    agent = await shop_builder().with_handlers({"ORDER_STATUS": order_status}).build(anthropic_client)
    result = await agent.process_message(user_id="u-h2", message=ORDER_QUESTION)

    assert result["content"] == "It shipped on Monday."
    assert result["handled_by"] == "llm"
    system = fake_llm.requests[0]["body"]["system"]
    assert system.endswith("Order A-1001: shipped Monday via UPS.")


@db
async def test_handler_can_escalate(anthropic_client, fake_llm):
    async def returns(ctx):
        return HandlerResult(escalate=True, reason="refunds over $100 need a human")

    agent = await shop_builder().with_handlers({"RETURNS": returns}).build(anthropic_client)
    result = await agent.process_message(user_id="u-h3", message=REFUND_QUESTION)

    assert result["escalated"] is True
    assert result["content"] == HANDOFF_NOTICE
    assert result["handled_by"] == "handoff"
    assert fake_llm.requests == []
    assert (await Thread.objects.aget(pk=result["thread_id"])).escalated is True


@db
async def test_handler_returning_none_leaves_the_turn_to_the_llm(anthropic_client, fake_llm):
    async def returns(ctx):
        ctx.metadata["looked"] = True
        return None

    agent = await shop_builder().with_handlers({"RETURNS": returns}).build(anthropic_client)
    result = await agent.process_message(user_id="u-h4", message=REFUND_QUESTION)

    assert result["content"] == f"Echo: {REFUND_QUESTION}"
    assert len(fake_llm.requests) == 1


@db
async def test_handler_is_skipped_when_a_human_must_answer(anthropic_client, fake_llm):
    calls = []

    async def returns(ctx):
        calls.append(ctx)
        return "automatic refund"

    agent = await (
        shop_builder()
        .with_handlers({"RETURNS": returns})
        .with_confidence_thresholds({"RETURNS": 0.0})
        .build(anthropic_client)
    )
    result = await agent.process_message(user_id="u-h5", message=REFUND_QUESTION)

    assert result["escalated"] is True and result["content"] == HANDOFF_NOTICE
    assert calls == []


@db
async def test_failing_handler_marks_the_turn_failed_and_it_can_be_retried(anthropic_client, fake_llm):
    attempts = []

    async def returns(ctx):
        attempts.append(ctx.message_id)
        if len(attempts) == 1:
            raise RuntimeError("refund service unreachable")
        return "Refund issued."

    agent = await shop_builder().with_handlers({"RETURNS": returns}).build(anthropic_client)
    stored = (await sync_to_async(pipeline.accept)(agent, user_id="u-h6", message=REFUND_QUESTION)).message

    with pytest.raises(RuntimeError, match="refund service unreachable"):
        await agent.run_turn(stored.pk)
    await stored.arefresh_from_db()
    assert stored.status == Message.Status.FAILED
    assert stored.error == "refund service unreachable"
    assert not await Message.objects.filter(reply_to=stored).aexists()

    result = await agent.run_turn(stored.pk)
    assert result["status"] == "done" and result["content"] == "Refund issued."
    assert attempts == [str(stored.pk), str(stored.pk)]


@db
async def test_handler_returning_a_wrong_type(anthropic_client, fake_llm):
    async def returns(ctx):
        return 42

    agent = await shop_builder().with_handlers({"RETURNS": returns}).build(anthropic_client)

    with pytest.raises(TypeError, match="returned int"):
        await agent.process_message(user_id="u-h7", message=REFUND_QUESTION)
    stored = await Message.objects.aget(user__external_id="u-h7")
    assert stored.status == Message.Status.FAILED


# --- middleware ------------------------------------------------------------------------------


class Recorder(Middleware):
    def __init__(self, name: str, events: list[str]) -> None:
        self.name = name
        self.events = events

    async def before_turn(self, ctx):
        self.events.append(f"{self.name}.before")

    async def after_turn(self, ctx, reply):
        self.events.append(f"{self.name}.after")
        return f"[{self.name}] {reply}"


@db
async def test_middleware_hooks_run_in_order_and_rewrite_the_stored_reply(anthropic_client, fake_llm):
    events: list[str] = []
    fake_llm.enqueue(FakeReply(text="Your order is on its way."))
    agent = await (
        shop_builder()
        .with_middleware([Recorder("outer", events), Recorder("inner", events)])
        .build(anthropic_client)
    )

    result = await agent.process_message(user_id="u-m1", message=ORDER_QUESTION)

    assert events == ["outer.before", "inner.before", "inner.after", "outer.after"]
    assert result["content"] == "[outer] [inner] Your order is on its way."
    reply = await Message.objects.aget(pk=result["reply_id"])
    assert reply.content == result["content"]


@db
async def test_middleware_can_answer_or_escalate(anthropic_client, fake_llm):
    class Maintenance:  # duck-typed: one hook is enough
        async def before_turn(self, ctx):
            if "order" in ctx.message:
                ctx.reply = "Order tracking is down for maintenance."
            else:
                ctx.escalate = True
                ctx.escalation_reason = "maintenance window"

    agent = await shop_builder().with_middleware(Maintenance()).build(anthropic_client)

    answered = await agent.process_message(user_id="u-m2", message=ORDER_QUESTION)
    escalated = await agent.process_message(user_id="u-m3", message=REFUND_QUESTION)

    assert answered["content"] == "Order tracking is down for maintenance."
    assert answered["handled_by"] == "middleware" and answered["escalated"] is False
    assert escalated["content"] == HANDOFF_NOTICE and escalated["escalated"] is True
    assert fake_llm.requests == []


@db
async def test_after_only_middleware(anthropic_client, fake_llm):
    class Signature:
        async def after_turn(self, ctx, reply):
            return reply + "\n-- Shop bot"

    agent = await shop_builder().with_middleware([Signature()]).build(anthropic_client)
    result = await agent.process_message(user_id="u-m4", message=ORDER_QUESTION)

    assert result["content"] == f"Echo: {ORDER_QUESTION}\n-- Shop bot"


# --- tools -----------------------------------------------------------------------------------


def order_tools(calls: list[dict]) -> Client:
    server = FastMCP("orders")

    @server.tool
    def lookup_order(order_id: str) -> str:
        """Look up an order's shipping status."""
        calls.append({"order_id": order_id})
        if order_id == "BROKEN":
            raise ValueError("order database offline")
        return f"Order {order_id}: shipped Monday via UPS"

    return Client(server)


@db
async def test_tool_use_round_trip(anthropic_client, fake_llm):
    calls: list[dict] = []
    fake_llm.enqueue(
        FakeReply(tool_calls=[ToolCall("lookup_order", {"order_id": "A-1001"}, id="toolu_order_1")]),
        FakeReply(text="Your order A-1001 shipped Monday via UPS."),
    )
    agent = await shop_builder().build(anthropic_client, order_tools(calls))

    result = await agent.process_message(user_id="u-t1", message=ORDER_QUESTION)

    assert calls == [{"order_id": "A-1001"}]
    assert result["content"] == "Your order A-1001 shipped Monday via UPS."
    assert result["handled_by"] == "llm"
    first, second = (r["body"] for r in fake_llm.requests)
    assert [t["name"] for t in first["tools"]] == ["lookup_order"]
    assert first["tools"][0]["input_schema"]["required"] == ["order_id"]
    assert second["messages"][:1] == [{"role": "user", "content": ORDER_QUESTION}]
    assert second["messages"][1]["role"] == "assistant"
    assert second["messages"][1]["content"] == [
        {"type": "tool_use", "id": "toolu_order_1", "name": "lookup_order", "input": {"order_id": "A-1001"}}
    ]
    assert second["messages"][2] == {
        "role": "user",
        "content": [
            {
                "type": "tool_result",
                "tool_use_id": "toolu_order_1",
                "content": "Order A-1001: shipped Monday via UPS",
                "is_error": False,
            }
        ],
    }
    reply = await Message.objects.aget(pk=result["reply_id"])
    assert reply.tool_calls == [{"name": "lookup_order", "input": {"order_id": "A-1001"}, "is_error": False}]


@db
async def test_failing_tool_is_reported_to_the_llm(anthropic_client, fake_llm):
    calls: list[dict] = []
    fake_llm.enqueue(
        FakeReply(tool_calls=[ToolCall("lookup_order", {"order_id": "BROKEN"}, id="toolu_broken")]),
        FakeReply(text="I can't look that up right now."),
    )
    agent = await shop_builder().build(anthropic_client, order_tools(calls))

    result = await agent.process_message(user_id="u-t2", message=ORDER_QUESTION)

    assert result["content"] == "I can't look that up right now."
    tool_result = fake_llm.requests[1]["body"]["messages"][2]["content"][0]
    assert tool_result["tool_use_id"] == "toolu_broken" and tool_result["is_error"] is True
    assert "order database offline" in tool_result["content"]
    reply = await Message.objects.aget(pk=result["reply_id"])
    assert reply.tool_calls == [{"name": "lookup_order", "input": {"order_id": "BROKEN"}, "is_error": True}]


@db
async def test_tool_round_limit_never_stores_an_empty_reply(anthropic_client, fake_llm):
    calls: list[dict] = []
    fake_llm.enqueue(
        FakeReply(tool_calls=[ToolCall("lookup_order", {"order_id": "A-1"})]),
        FakeReply(tool_calls=[ToolCall("lookup_order", {"order_id": "A-2"})]),
        FakeReply(text="Follow-up answer."),
    )
    agent = await (
        shop_builder()
        .with_config({"llm_config": {"max_tool_rounds": 1}})
        .build(anthropic_client, order_tools(calls))
    )

    result = await agent.process_message(user_id="u-t4", message=ORDER_QUESTION)

    assert calls == [{"order_id": "A-1"}]  # the second tool call was over the limit
    assert len(fake_llm.requests) == 2
    assert result["content"] == NO_ANSWER_NOTICE
    # The thread's next turn sends that reply as history; an empty one would be rejected by the API.
    follow_up = await agent.process_message(user_id="u-t4", message="It was supposed to arrive on Monday")
    assert follow_up["content"] == "Follow-up answer."
    history = fake_llm.requests[2]["body"]["messages"]
    assert history[1] == {"role": "assistant", "content": NO_ANSWER_NOTICE}


@db
async def test_usage_adds_up_over_tool_rounds(anthropic_client, fake_llm):
    fake_llm.enqueue(
        FakeReply(tool_calls=[ToolCall("lookup_order", {"order_id": "A-7"})]),
        FakeReply(text="Shipped."),
    )
    agent = await shop_builder().build(anthropic_client, order_tools([]))

    result = await agent.process_message(user_id="u-t3", message=ORDER_QUESTION)

    # Re-ask the fake for the same two requests to learn what it reported for each.
    client = anthropic_client
    expected = {"input_tokens": 0, "output_tokens": 0}
    fake_llm.enqueue(
        FakeReply(tool_calls=[ToolCall("lookup_order", {"order_id": "A-7"})]), FakeReply(text="Shipped.")
    )
    for request in fake_llm.requests[:2]:
        body = {k: v for k, v in request["body"].items() if k != "temperature"}
        message = await client.messages.create(**body)
        expected["input_tokens"] += message.usage.input_tokens
        expected["output_tokens"] += message.usage.output_tokens
    assert result["usage"] == expected


# --- LLM errors ------------------------------------------------------------------------------

# These tests are about failing: no fallback reply (tests/conversations/test_recovery.py has those).
NO_RETRIES = {"llm_config": {"max_retries": 0}, "fallback_config": {"enabled": False}}


@db
async def test_rate_limit_exhausted_is_transient_and_the_message_fails(anthropic_client, fake_llm):
    fake_llm.enqueue_error(429, retry_after=0)
    agent = await shop_builder().with_config(NO_RETRIES).build(anthropic_client)

    with pytest.raises(LLMError) as info:
        await agent.process_message(user_id="u-e1", message=ORDER_QUESTION)

    assert info.value.transient is True
    assert info.value.code == "llm_error"
    assert "429" in str(info.value)
    assert len(fake_llm.requests) == 1
    stored = await Message.objects.aget(user__external_id="u-e1", role="user")
    assert stored.status == Message.Status.FAILED
    assert "429" in stored.error
    assert await Message.objects.filter(role="assistant").acount() == 0

    # The failed turn is retried from PostgreSQL, in the thread decided the first time.
    fake_llm.enqueue(FakeReply(text="It shipped."))
    retried = await agent.run_turn(stored.pk)
    assert retried["status"] == "done" and retried["content"] == "It shipped."
    assert retried["thread_id"] == str(stored.thread_id)
    assert await Thread.objects.acount() == 1


@db
async def test_sdk_retries_before_giving_up(anthropic_client, fake_llm):
    fake_llm.enqueue_error(429, retry_after=0, times=3)
    agent = await (
        shop_builder()
        .with_config({"llm_config": {"max_retries": 2}, "fallback_config": {"enabled": False}})
        .build(anthropic_client)
    )

    with pytest.raises(LLMError) as info:
        await agent.process_message(user_id="u-e2", message=ORDER_QUESTION)

    assert info.value.transient is True
    assert [r["headers"]["x-stainless-retry-count"] for r in fake_llm.requests] == ["0", "1", "2"]


@db
async def test_sdk_retry_recovers(anthropic_client, fake_llm):
    fake_llm.enqueue_error(529, retry_after=0)
    fake_llm.enqueue(FakeReply(text="Recovered."))
    agent = await shop_builder().with_config({"llm_config": {"max_retries": 1}}).build(anthropic_client)

    result = await agent.process_message(user_id="u-e3", message=ORDER_QUESTION)

    assert result["content"] == "Recovered."
    assert len(fake_llm.requests) == 2


@db
@pytest.mark.parametrize(
    ("status", "transient"), [(400, False), (401, False), (403, False), (500, True), (529, True)]
)
async def test_llm_error_transience(anthropic_client, fake_llm, status, transient):
    fake_llm.enqueue_error(status, retry_after=0)
    agent = await shop_builder().with_config(NO_RETRIES).build(anthropic_client)

    with pytest.raises(LLMError) as info:
        await agent.process_message(user_id="u-e4", message=ORDER_QUESTION)

    assert info.value.transient is transient
    assert f"Anthropic API error {status}" in str(info.value)
    stored = await Message.objects.aget(user__external_id="u-e4")
    assert stored.status == Message.Status.FAILED


# --- streaming -------------------------------------------------------------------------------


@db
async def test_streaming_deltas_join_to_the_final_content(anthropic_client, fake_llm):
    text = "Your order A-1001 left our warehouse on Monday and arrives Thursday."
    fake_llm.enqueue(FakeReply(text=text))
    agent = await shop_builder().build(anthropic_client)
    received = await sync_to_async(pipeline.accept)(agent, user_id="u-s1", message=ORDER_QUESTION)
    stored = received.message
    assert received.created is True and stored.status == Message.Status.PENDING
    deltas: list[str] = []

    async def on_text(delta: str) -> None:
        deltas.append(delta)

    result = await agent.run_turn(stored.pk, on_text=on_text)

    assert len(deltas) > 3
    assert "".join(deltas) == text == result["content"]
    assert fake_llm.requests[0]["body"]["stream"] is True
    assert result["usage"]["output_tokens"] > 0


@db
async def test_streaming_with_a_tool_round(anthropic_client, fake_llm):
    fake_llm.enqueue(
        FakeReply(text="Let me check.", tool_calls=[ToolCall("lookup_order", {"order_id": "A-1001"})]),
        FakeReply(text=" It shipped Monday."),
    )
    calls: list[dict] = []
    agent = await shop_builder().build(anthropic_client, order_tools(calls))
    stored = (await sync_to_async(pipeline.accept)(agent, user_id="u-s2", message=ORDER_QUESTION)).message
    deltas: list[str] = []

    async def on_text(delta: str) -> None:
        deltas.append(delta)

    result = await agent.run_turn(stored.pk, on_text=on_text)

    assert calls == [{"order_id": "A-1001"}]
    # What the user watched stream in is what is stored: the text of both rounds.
    assert "".join(deltas) == "Let me check. It shipped Monday." == result["content"]
    assert all(r["body"]["stream"] is True for r in fake_llm.requests)
    reply = await Message.objects.aget(pk=result["reply_id"])
    assert reply.content == result["content"]


# --- classify, idempotency, input checks -----------------------------------------------------


@db
async def test_classify(anthropic_client, fake_llm):
    agent = await shop_builder().build(anthropic_client)

    result = await agent.classify(ORDER_QUESTION)

    assert isinstance(result, Classification)
    assert result.intent == "ORDER_STATUS"
    assert 0.0 <= result.confidence <= 1.0
    assert {s.name for s in result.runners_up} == {"PRODUCT_SEARCH", "RETURNS"}
    scores = [result.confidence, *(s.confidence for s in result.runners_up)]
    assert scores == sorted(scores, reverse=True)
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert result.as_dict()["runners_up"][0] == {
        "intent": result.runners_up[0].name,
        "confidence": result.runners_up[0].confidence,
    }
    assert fake_llm.requests == []
    assert await Message.objects.acount() == 0


@db
async def test_same_client_message_id_runs_one_turn(anthropic_client, fake_llm):
    agent = await shop_builder().build(anthropic_client)

    first = await agent.process_message(user_id="u-i1", message=ORDER_QUESTION, client_message_id="c-1")
    again = await agent.process_message(user_id="u-i1", message=ORDER_QUESTION, client_message_id="c-1")
    rerun = await agent.run_turn(first["message_id"])

    assert again == first == rerun
    assert len(fake_llm.requests) == 1
    assert await Message.objects.filter(user__external_id="u-i1").acount() == 2


@db
@pytest.mark.parametrize(
    ("user_id", "message", "field"),
    [
        ("u-v1", "   ", "message"),
        ("u-v1", "\x00\x01", "message"),
        ("", "hi", "user_id"),
        ("u-v1", "x" * 41, "message"),
    ],
)
async def test_invalid_input_stores_nothing(anthropic_client, fake_llm, user_id, message, field):
    agent = (
        await shop_builder().with_config({"input_config": {"max_message_chars": 40}}).build(anthropic_client)
    )

    with pytest.raises(InvalidInput) as info:
        await agent.process_message(user_id=user_id, message=message)

    assert info.value.field == field and info.value.code == "invalid_input"
    assert await EndUser.objects.acount() == 0
    assert await Message.objects.acount() == 0
    assert fake_llm.requests == []


@db
async def test_rate_limit_stores_nothing(anthropic_client, fake_llm):
    agent = (
        await shop_builder()
        .with_config({"rate_limit_config": {"messages_per_minute": 2, "burst": 2}})
        .build(anthropic_client)
    )
    await agent.process_message(user_id="u-r1", message=ORDER_QUESTION)
    await agent.process_message(user_id="u-r1", message="It was supposed to arrive on Monday")

    with pytest.raises(RateLimited) as info:
        await agent.process_message(user_id="u-r1", message="Hello?")

    assert 1 <= info.value.retry_after <= 30
    assert await Message.objects.filter(user__external_id="u-r1", role="user").acount() == 2
    assert len(fake_llm.requests) == 2
    # Another user is not limited.
    other = await agent.process_message(user_id="u-r2", message=ORDER_QUESTION)
    assert other["status"] == "done"
