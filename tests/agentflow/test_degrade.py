"""Issue 11, graceful degradation in-process: fallback reply, circuit breaker, unreachable MCP server."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from django.conf import settings
from django.core.cache import cache
from fastmcp import Client

from agentflow import AgentFrameworkBuilder, ConfigError, IntentCategory
from agentflow.config import DEFAULT_FALLBACK_REPLY, resolve_config
from agentflow.limits import STALE_CLAIM, TURN_HARD_LIMIT, TURN_SOFT_LIMIT, VISIBILITY_TIMEOUT
from agentflow.testing.fake_anthropic import FakeReply
from conversations.models import Escalation, Message

db = pytest.mark.django_db(transaction=True)

SHOP = [
    IntentCategory("ORDER_STATUS", "Order tracking", ["Where is my order", "Delivery"]),
    IntentCategory("RETURNS", "Returns & refunds", ["Return this", "Refund request"]),
]
ORDER_QUESTION = "Where is my order A-1001?"
NO_RETRIES = {"llm_config": {"max_retries": 0}}


def shop(config: dict | None = None) -> AgentFrameworkBuilder:
    return AgentFrameworkBuilder().with_intent_categories(SHOP).with_config({**NO_RETRIES, **(config or {})})


@db
async def test_llm_down_gives_the_configured_fallback_and_escalates(anthropic_client, fake_llm):
    fake_llm.enqueue_error(503, retry_after=0)
    agent = await shop({"fallback_config": {"reply": "We are on it, a person will answer."}}).build(
        anthropic_client
    )

    result = await agent.process_message(user_id="u-d1", message=ORDER_QUESTION)

    assert (result["status"], result["content"], result["handled_by"], result["escalated"]) == (
        "done",
        "We are on it, a person will answer.",
        "fallback",
        True,
    )
    stored = await Message.objects.aget(user__external_id="u-d1", role="user")
    assert (stored.status, stored.error) == ("done", "")
    escalation = await Escalation.objects.aget(thread_id=stored.thread_id)
    assert escalation.reason.startswith("LLM unavailable: Anthropic API error 503")
    assert await Message.objects.filter(role="assistant").acount() == 1


@db
async def test_fallback_without_escalation(anthropic_client, fake_llm):
    fake_llm.enqueue_error(529, retry_after=0)
    agent = await shop({"fallback_config": {"escalate": False}}).build(anthropic_client)

    result = await agent.process_message(user_id="u-d2", message=ORDER_QUESTION)

    assert (result["content"], result["handled_by"], result["escalated"]) == (
        DEFAULT_FALLBACK_REPLY,
        "fallback",
        False,
    )
    assert await Escalation.objects.acount() == 0


@db
async def test_a_non_transient_llm_error_still_fails_the_message(anthropic_client, fake_llm):
    fake_llm.enqueue_error(400, message="prompt is too long")
    agent = await shop().build(anthropic_client)

    with pytest.raises(Exception, match="Anthropic API error 400"):
        await agent.process_message(user_id="u-d3", message=ORDER_QUESTION)

    stored = await Message.objects.aget(user__external_id="u-d3", role="user")
    assert stored.status == "failed"
    assert await Message.objects.filter(role="assistant").acount() == 0


@db
async def test_the_breaker_opens_after_the_threshold_and_skips_the_llm(anthropic_client, fake_llm):
    fake_llm.enqueue_error(500, retry_after=0, times=2)
    agent = await shop({"name": "breaker-shop", "fallback_config": {"breaker_failures": 2}}).build(
        anthropic_client
    )

    results = [await agent.process_message(user_id=f"u-d4-{n}", message=ORDER_QUESTION) for n in range(3)]

    assert [(r["content"], r["handled_by"]) for r in results] == [(DEFAULT_FALLBACK_REPLY, "fallback")] * 3
    assert len(fake_llm.requests) == 2  # the third turn never reached the LLM
    assert cache.get("llm-breaker:breaker-shop:open") == 1

    # After the open time, the first failure opens it again at once (half-open trial).
    cache.delete("llm-breaker:breaker-shop:open")
    fake_llm.enqueue_error(500, retry_after=0)
    again = await agent.process_message(user_id="u-d4-3", message=ORDER_QUESTION)
    assert again["handled_by"] == "fallback"
    assert len(fake_llm.requests) == 3
    assert cache.get("llm-breaker:breaker-shop:open") == 1


@db
async def test_an_unreachable_mcp_server_leaves_the_turn_without_tools(anthropic_client, fake_llm, caplog):
    fake_llm.enqueue(FakeReply(text="Your order is on its way."))
    unreachable = Client("http://127.0.0.1:9/mcp")  # nothing listens on port 9 (discard)
    agent = await shop().build(anthropic_client, unreachable)

    result = await agent.process_message(user_id="u-d5", message=ORDER_QUESTION)

    assert (result["status"], result["content"], result["handled_by"]) == (
        "done",
        "Your order is on its way.",
        "llm",
    )
    reply = await Message.objects.aget(role="assistant")
    [missing] = reply.tool_calls
    assert (missing["name"], missing["input"], missing["is_error"]) == ("list_tools", {}, True)
    assert missing["error"].startswith("tools unavailable: ")
    assert "tools" not in fake_llm.requests[0]["body"]
    assert any("tools unavailable, the turn runs without them" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("AGENT_FALLBACK_BREAKER_FAILURES", "0"),
        ("AGENT_FALLBACK_BREAKER_OPEN_SECONDS", "-1"),
        ("AGENT_FALLBACK_ENABLED", "maybe"),
        ("AGENT_FALLBACK_REPLY", ""),
    ],
)
def test_bad_fallback_settings_name_the_variable(variable, value):
    with pytest.raises(ConfigError) as info:
        resolve_config([], environ={variable: value})

    assert variable in str(info.value)


def test_fallback_settings_from_the_environment():
    config = resolve_config(
        [], environ={"AGENT_FALLBACK_BREAKER_FAILURES": "3", "AGENT_FALLBACK_ESCALATE": "false"}
    )

    assert (config.fallback_config.breaker_failures, config.fallback_config.escalate) == (3, False)
    assert config.fallback_config.enabled is True


def test_the_recovery_windows_are_consistent():
    assert (TURN_SOFT_LIMIT.total_seconds(), TURN_HARD_LIMIT.total_seconds()) == (240, 270)
    assert (STALE_CLAIM.total_seconds(), VISIBILITY_TIMEOUT.total_seconds()) == (300, 360)
    # The broker pool: every worker thread acknowledges its own task (agentflow_project.broker).
    options = {"visibility_timeout": 360, "max_connections": settings.CELERY_WORKER_CONCURRENCY + 16}
    assert settings.CELERY_BROKER_TRANSPORT_OPTIONS == options

    from agentflow_project.celery import app
    from conversations.tasks import process_turn

    assert (process_turn.soft_time_limit, process_turn.time_limit) == (255, 270)
    assert app.conf.broker_transport_options == options
    assert app.conf.beat_schedule["conversations-recover-unanswered"] == {
        "task": "conversations.recover_unanswered",
        "schedule": 30.0,
    }


def _limits_in_a_new_process(value: str) -> subprocess.CompletedProcess[str]:
    code = (
        "from agentflow import limits as l; "
        "print(*(int(w.total_seconds()) for w in (l.TURN_SOFT_LIMIT, l.CELERY_SOFT_LIMIT,"
        " l.TURN_HARD_LIMIT, l.STALE_CLAIM, l.VISIBILITY_TIMEOUT)))"
    )
    env = {**os.environ, "AGENTFLOW_TURN_TIME_LIMIT": value}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=False)


def test_the_turn_time_limit_variable_moves_every_window():
    done = _limits_in_a_new_process("600")

    assert (done.returncode, done.stdout) == (0, "600 615 630 660 720\n")


def test_a_turn_time_limit_under_a_minute_shrinks_the_margins_too():
    done = _limits_in_a_new_process("12")

    assert (done.returncode, done.stdout) == (0, "12 15 18 24 36\n")


@pytest.mark.parametrize("value", ["9", "3601", "1.5", "abc", "-60"])
def test_a_bad_turn_time_limit_stops_start_up(value):
    done = _limits_in_a_new_process(value)

    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        f"agentflow.errors.ConfigError: AGENTFLOW_TURN_TIME_LIMIT must be whole seconds from 10 to 3600"
        f" (got {value!r})"
    )
