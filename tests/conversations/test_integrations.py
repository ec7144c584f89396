"""The seed's integrations against local fake HTTP servers: Slack notices of escalations and failed
turns (through the real Celery worker and inline jobs), the LLM's create_ticket tool and the admin's
"Create Jira issue" action, with their audit rows."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from django.test import AsyncClient
from django.urls import reverse

from agentflow import AgentFrameworkBuilder, IntentCategory
from agentflow.errors import LLMError
from agentflow.jobs import wait_for_inline_jobs
from agentflow.registry import clear_agent_cache, default_backend
from agentflow.testing.fake_anthropic import FakeReply, ToolCall
from agentflow.testing.fake_http import FakeHTTPServer
from conversations.models import AuditEvent, Escalation, Message, Thread
from conversations.notifications import notify_slack

from .helpers import turn_settled

SLACK_VAR, JIRA_VAR = "AF_TEST_SLACK_WEBHOOK", "AF_TEST_JIRA_TOKEN"
BILLING = IntentCategory(
    "BILLING", "Invoices and charges", ["Why was I charged twice?", "Where is my invoice?"], threshold=0.7
)
ESCALATION = IntentCategory(
    "ESCALATION", "Urgent issues that need a human now", ["I want to speak to a manager"], handoff=True
)
SUPPORT = IntentCategory(
    "SUPPORT", "Product problems", ["The export button crashes the app", "The app is broken"]
)
QUIET = {"session_config": {"llm_thread_judgement": False}, "memory_config": {"enabled": False}}


@pytest.fixture
def slack_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHTTPServer]:
    with FakeHTTPServer() as server:
        monkeypatch.setenv(SLACK_VAR, server.url("/services/T0/B0/secret"))
        yield server


@pytest.fixture
def jira_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHTTPServer]:
    with FakeHTTPServer() as server:
        monkeypatch.setenv(JIRA_VAR, "jira-token-123")
        yield server


def _slack(**extra: Any) -> dict[str, Any]:
    return {"tools_config": {"slack_integration": {"webhook_url": "${" + SLACK_VAR + "}", **extra}}}


def _jira(server: FakeHTTPServer, **extra: Any) -> dict[str, Any]:
    block = {"server_url": server.url(), "auth_token": "${" + JIRA_VAR + "}", "project_key": "SUP", **extra}
    return {"tools_config": {"jira_integration": block}}


def _audit(action: str) -> list[tuple[str, str, dict[str, Any]]]:
    rows = AuditEvent.objects.filter(action=action).order_by("created_at", "id")
    return [(row.target_type, row.target_id, row.detail) for row in rows]


def _wait_for(predicate: Any, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


# --- Slack: an escalation through the real worker ----------------------------------------------------


def billing_agent() -> Any:
    """The default agent of the worker test: BILLING needs 0.7; Slack on escalations, linking the admin."""
    return (
        AgentFrameworkBuilder()
        .with_intent_categories([BILLING])
        .with_config(QUIET)
        .with_config(_slack(admin_base_url="https://ops.example.com"))
        .build_sync(default_backend())
    )


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
async def test_a_handed_off_turn_on_the_worker_posts_one_slack_notice(
    celery_worker, api_key, fake_llm, slack_server, settings
) -> None:
    settings.AGENTFLOW = {
        **settings.AGENTFLOW,
        "AGENT_FACTORY": f"{__name__}.billing_agent",
        "BACKGROUND_JOBS": True,
    }
    clear_agent_cache()
    fake_llm.enqueue(FakeReply(text="<confidence>0.05</confidence>\nMaybe a bank error?"))

    response = await AsyncClient().post(
        "/api/users/alice/messages",
        {"message": "Why was I charged twice? Mail me at alice@example.com"},
        content_type="application/json",
        headers={"X-API-Key": api_key},
    )
    body = response.json()
    await turn_settled(body["message_id"])
    await sync_to_async(_wait_for)(lambda: AuditEvent.objects.filter(action="slack_notify").exists())

    assert (response.status_code, body["escalated"], body["handled_by"]) == (200, True, "handoff")
    escalation = await Escalation.objects.aget()
    [request] = slack_server.requests
    assert request["path"] == "/services/T0/B0/secret"
    payload = request["json"]
    assert payload["text"] == f"Handed to a human: agent agentflow, user alice: {escalation.reason}"
    assert "withheld draft: Maybe a bank error?" in escalation.reason
    blocks = payload["blocks"]
    assert blocks[0] == {"type": "header", "text": {"type": "plain_text", "text": "Handed to a human"}}
    assert blocks[1]["fields"][:3] == [
        {"type": "mrkdwn", "text": "*Agent*\nagentflow"},
        {"type": "mrkdwn", "text": "*User*\nalice"},
        {"type": "mrkdwn", "text": "*Intent*\nBILLING"},
    ]
    # The excerpt is scrubbed of personal data by default.
    assert blocks[3]["text"]["text"] == "*Message*\n>Why was I charged twice? Mail me at [email]"
    assert blocks[4]["elements"][0]["url"] == (
        f"https://ops.example.com/admin/conversations/escalation/{escalation.pk}/change/"
    )
    rows = await sync_to_async(_audit)("slack_notify")
    assert rows == [
        (
            "escalation",
            str(escalation.pk),
            {"event": "escalation", "outcome": "sent", "status": 200, "attempt": 1},
        )
    ]
    assert await AuditEvent.objects.filter(action="slack_notify", subject="alice").acount() == 1


# --- Slack: retries, refusals, once only (inline jobs of a script's agent) -----------------------


async def _escalating_agent(client: Any, **slack: Any) -> Any:
    config = _slack(retry_backoff_seconds=0.05, excerpt="full", **slack)
    return (
        await AgentFrameworkBuilder()
        .with_intent_categories([ESCALATION])
        .with_config(QUIET)
        .with_config(config)
        .build(client)
    )


@pytest.mark.django_db(transaction=True)
async def test_a_500_is_retried_then_sent_and_a_second_run_posts_nothing(
    anthropic_client, slack_server, settings
) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "BACKGROUND_JOBS": True}
    slack_server.enqueue(500, "internal_error")
    agent = await _escalating_agent(anthropic_client)

    result = await agent.process_message(user_id="bob", message="I want to speak to a manager")
    await sync_to_async(wait_for_inline_jobs)(timeout=20)

    escalation = await Escalation.objects.aget()
    assert result["escalated"] is True
    assert len(slack_server.requests) == 2
    assert slack_server.requests[0]["json"] == slack_server.requests[1]["json"]
    assert ">I want to speak to a manager" in slack_server.requests[1]["json"]["blocks"][3]["text"]["text"]
    sent = [
        (
            "escalation",
            str(escalation.pk),
            {
                "event": "escalation",
                "outcome": "retry",
                "status": 500,
                "attempt": 1,
                "error": "HTTP 500: internal_error",
            },
        ),
        (
            "escalation",
            str(escalation.pk),
            {"event": "escalation", "outcome": "sent", "status": 200, "attempt": 2},
        ),
    ]
    assert await sync_to_async(_audit)("slack_notify") == sent

    again = await sync_to_async(notify_slack.apply)(args=[result["message_id"], "escalation"])

    assert again.result == "duplicate"
    assert len(slack_server.requests) == 2
    assert await sync_to_async(_audit)("slack_notify") == sent


@pytest.mark.django_db(transaction=True)
async def test_a_400_is_not_retried_and_is_audited_as_rejected(
    anthropic_client, slack_server, settings
) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "BACKGROUND_JOBS": True}
    slack_server.enqueue(400, "invalid_blocks")
    agent = await _escalating_agent(anthropic_client)

    await agent.process_message(user_id="bob", message="I want to speak to a manager")
    await sync_to_async(wait_for_inline_jobs)(timeout=20)

    escalation = await Escalation.objects.aget()
    assert len(slack_server.requests) == 1
    assert await sync_to_async(_audit)("slack_notify") == [
        (
            "escalation",
            str(escalation.pk),
            {
                "event": "escalation",
                "outcome": "rejected",
                "status": 400,
                "attempt": 1,
                "error": "HTTP 400: invalid_blocks",
            },
        )
    ]


@pytest.mark.django_db(transaction=True)
async def test_transient_failures_give_up_after_max_retries(anthropic_client, slack_server, settings) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "BACKGROUND_JOBS": True}
    for _ in range(3):
        slack_server.enqueue(503, "down", headers={"Retry-After": "0"})
    agent = await _escalating_agent(anthropic_client, max_retries=2)

    await agent.process_message(user_id="bob", message="I want to speak to a manager")
    await sync_to_async(wait_for_inline_jobs)(timeout=20)

    outcomes = [(d["outcome"], d["attempt"]) for _, _, d in await sync_to_async(_audit)("slack_notify")]
    assert outcomes == [("retry", 1), ("retry", 2), ("failed", 3)]
    assert len(slack_server.requests) == 3


@pytest.mark.django_db(transaction=True)
async def test_a_failed_turn_is_posted_when_notify_on_asks_for_failures(
    anthropic_client, fake_llm, slack_server, settings
) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "BACKGROUND_JOBS": True}
    fake_llm.enqueue_error(400, "invalid_request_error", "prompt is too long")
    config = _slack(notify_on=["failure"], excerpt="none")
    agent = (
        await AgentFrameworkBuilder()
        .with_intent_categories([SUPPORT])
        .with_config(QUIET)
        .with_config(config)
        .build(anthropic_client)
    )

    with pytest.raises(LLMError):
        await agent.process_message(user_id="carol", message="The export button crashes the app")
    await sync_to_async(wait_for_inline_jobs)(timeout=20)

    message = await Message.objects.aget(role="user")
    [request] = slack_server.requests
    payload = request["json"]
    assert message.status == "failed"
    assert payload["text"].startswith("A turn failed: agent agentflow, user carol: ")
    assert "prompt is too long" in payload["text"]
    assert all("*Message*" not in str(block) for block in payload["blocks"])  # excerpt: none
    rows = await sync_to_async(_audit)("slack_notify")
    assert rows == [
        ("message", str(message.pk), {"event": "failure", "outcome": "sent", "status": 200, "attempt": 1})
    ]


@pytest.mark.django_db(transaction=True)
async def test_no_slack_settings_no_job(anthropic_client, slack_server, settings) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "BACKGROUND_JOBS": True}
    agent = (
        await AgentFrameworkBuilder()
        .with_intent_categories([ESCALATION])
        .with_config(QUIET)
        .build(anthropic_client)
    )

    await agent.process_message(user_id="bob", message="I want to speak to a manager")
    await sync_to_async(wait_for_inline_jobs)(timeout=20)

    assert slack_server.requests == []
    assert await AuditEvent.objects.filter(action="slack_notify").acount() == 0


# --- Jira: the LLM's create_ticket tool -------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_the_llm_creates_a_ticket_and_the_reply_carries_its_key(
    anthropic_client, fake_llm, jira_server
) -> None:
    jira_server.enqueue(
        201, {"id": "10007", "key": "SUP-7", "self": jira_server.url("/rest/api/2/issue/10007")}
    )
    config = {
        **_jira(jira_server, issue_type="Bug"),
        "confidence_config": {"llm_self_assessment": False, "llm_intent_judgement": False},
    }
    agent = (
        await AgentFrameworkBuilder()
        .with_intent_categories([SUPPORT])
        .with_config(QUIET)
        .with_config(config)
        .build(anthropic_client)
    )
    arguments = {"summary": "Export button crashes", "description": "Crashes on every export since today."}
    fake_llm.enqueue(
        FakeReply(tool_calls=[ToolCall("create_ticket", arguments, id="toolu_1")]), FakeReply(text=None)
    )

    result = await agent.process_message(user_id="alice", message="The export button crashes the app")

    expected = f"Created ticket SUP-7 ({jira_server.url('/browse/SUP-7')})."
    assert result["content"] == f"Echo: Tool result: {expected}"  # the fake model echoes the tool result
    [request] = jira_server.requests
    assert (request["path"], request["headers"]["authorization"]) == (
        "/rest/api/2/issue",
        "Bearer jira-token-123",
    )
    assert request["json"] == {
        "fields": {
            "project": {"key": "SUP"},
            "summary": "Export button crashes",
            "description": "Crashes on every export since today.",
            "issuetype": {"name": "Bug"},
        }
    }
    first, second = fake_llm.requests
    assert [t["name"] for t in first["body"]["tools"]] == ["create_ticket"]
    assert second["body"]["messages"][-1]["content"] == [
        {"type": "tool_result", "tool_use_id": "toolu_1", "content": expected, "is_error": False}
    ]
    reply = await Message.objects.aget(role="assistant")
    assert reply.tool_calls == [{"name": "create_ticket", "input": arguments, "is_error": False}]
    rows = await sync_to_async(_audit)("jira_issue")
    assert rows == [
        (
            "thread",
            result["thread_id"],
            {
                "outcome": "created",
                "issue_key": "SUP-7",
                "status": 201,
                "attempts": 1,
                "message_id": result["message_id"],
                "via": "llm_tool",
            },
        )
    ]
    assert await AuditEvent.objects.filter(
        action="jira_issue", subject="alice", actor_kind="system"
    ).aexists()


@pytest.mark.django_db(transaction=True)
async def test_a_refused_ticket_is_an_error_the_llm_sees(anthropic_client, fake_llm, jira_server) -> None:
    jira_server.enqueue(400, {"errorMessages": ["project SUP does not exist"], "errors": {}})
    config = {
        **_jira(jira_server),
        "confidence_config": {"llm_self_assessment": False, "llm_intent_judgement": False},
    }
    agent = (
        await AgentFrameworkBuilder()
        .with_intent_categories([SUPPORT])
        .with_config(QUIET)
        .with_config(config)
        .build(anthropic_client)
    )
    fake_llm.enqueue(
        FakeReply(tool_calls=[ToolCall("create_ticket", {"summary": "x"}, id="t1")]), FakeReply(text="Sorry.")
    )

    result = await agent.process_message(user_id="alice", message="The export button crashes the app")

    assert result["content"] == "Sorry."
    assert len(jira_server.requests) == 1  # a 4xx is not retried
    tool_result = fake_llm.requests[1]["body"]["messages"][-1]["content"][0]
    assert tool_result["is_error"] is True and "project SUP does not exist" in tool_result["content"]
    [(_, _, detail)] = await sync_to_async(_audit)("jira_issue")
    assert (detail["outcome"], detail["status"], detail["via"]) == ("failed", 400, "llm_tool")


# --- Jira: the admin's thread action ------------------------------------------------------------------


@pytest.fixture
def staff_client(client, django_user_model):
    staff = django_user_model.objects.create_superuser("ops", "ops@example.com", "ops-password-123")
    client.force_login(staff)
    return client


def _thread_action(client: Any, *threads: Thread) -> list[str]:
    response = client.post(
        reverse("admin:conversations_thread_changelist"),
        {"action": "create_jira_issue", "_selected_action": [t.pk for t in threads]},
        follow=True,
    )
    assert response.status_code == 200
    return [str(m) for m in response.context["messages"]]


@pytest.mark.django_db(transaction=True)
def test_staff_create_a_jira_issue_from_a_thread(staff_client, jira_server) -> None:
    jira_server.enqueue(201, {"key": "SUP-11"})
    agent = (
        AgentFrameworkBuilder()
        .with_intent_categories([SUPPORT])
        .with_config(QUIET)
        .with_config(_jira(jira_server))
        .build_sync(None)
    )
    async_to_sync(agent.process_message)(user_id="dave", message="The export button crashes the app")
    thread = Thread.objects.get()

    notices = _thread_action(staff_client, thread)

    assert notices == [f"Created Jira issue SUP-11 for “{thread}”."]
    [request] = jira_server.requests
    fields = request["json"]["fields"]
    assert request["headers"]["authorization"] == "Bearer jira-token-123"
    assert fields["summary"] == "[agentflow] The export button crashes the app"
    assert (fields["project"], fields["issuetype"]) == ({"key": "SUP"}, {"name": "Task"})
    description = fields["description"]
    assert f"Conversation with user dave (thread {thread.pk}, open, intent SUPPORT)." in description
    assert "User: The export button crashes the app" in description
    assert "Assistant: [Offline mode]" in description
    [row] = AuditEvent.objects.filter(action="jira_issue")
    assert (row.staff_username, row.subject, row.target_type, row.target_id) == (
        "ops",
        "dave",
        "thread",
        str(thread.pk),
    )
    assert row.detail == {
        "outcome": "created",
        "issue_key": "SUP-11",
        "status": 201,
        "attempts": 1,
        "via": "admin",
    }


@pytest.mark.django_db(transaction=True)
def test_the_action_reports_a_refusal_and_an_agent_without_jira(
    staff_client, jira_server, monkeypatch
) -> None:
    jira_server.enqueue(403, "forbidden")
    with_jira = (
        AgentFrameworkBuilder()
        .with_intent_categories([SUPPORT])
        .with_config(QUIET)
        .with_config(_jira(jira_server))
        .build_sync(None)
    )
    async_to_sync(with_jira.process_message)(user_id="dave", message="The export button crashes the app")
    plain = (
        AgentFrameworkBuilder()
        .with_intent_categories([SUPPORT])
        .with_config(QUIET)
        .with_config({"name": "plain"})
        .build_sync(None)
    )
    async_to_sync(plain.process_message)(user_id="erin", message="The app is broken")
    refused, unconfigured = (
        Thread.objects.get(user__external_id="dave"),
        Thread.objects.get(user__external_id="erin"),
    )

    assert _thread_action(staff_client, refused) == [
        f"Jira issue for “{refused}” not created: HTTP 403: forbidden"
    ]
    assert _thread_action(staff_client, unconfigured) == [
        "Agent plain has no complete jira_integration (server_url, auth_token, project_key)."
    ]
    assert len(jira_server.requests) == 1
    [row] = AuditEvent.objects.filter(action="jira_issue")
    assert (row.detail["outcome"], row.detail["status"], row.target_id) == ("failed", 403, str(refused.pk))


@pytest.mark.django_db(transaction=True)
async def test_messages_in_a_held_thread_do_not_post_the_escalation_again(
    anthropic_client, slack_server, settings
) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "BACKGROUND_JOBS": True}
    agent = await _escalating_agent(anthropic_client)

    await agent.process_message(user_id="bob", message="I want to speak to a manager")
    held = await agent.process_message(user_id="bob", message="Hello? I am still waiting for the manager")
    await sync_to_async(wait_for_inline_jobs)(timeout=20)

    assert held["handled_by"] == "human"
    assert len(slack_server.requests) == 1
    assert [d["outcome"] for _, _, d in await sync_to_async(_audit)("slack_notify")] == ["sent"]


@pytest.mark.django_db(transaction=True)
def test_two_runs_at_once_post_once(anthropic_client, slack_server) -> None:
    import threading

    from django.db import connections

    agent = async_to_sync(_escalating_agent)(anthropic_client)  # background jobs off: no job of its own
    result = async_to_sync(agent.process_message)(user_id="bob", message="I want to speak to a manager")
    slack_server.enqueue(200, "ok", delay=1.0)  # the first post is slow: the second run finds it in flight
    outcomes: list[str] = []

    def run() -> None:
        try:
            outcomes.append(notify_slack.apply(args=[result["message_id"], "escalation"]).result)
        finally:
            connections.close_all()

    first = threading.Thread(target=run)
    first.start()
    _wait_for(lambda: len(slack_server.requests) == 1)
    run()
    first.join(timeout=20)
    later = notify_slack.apply(args=[result["message_id"], "escalation"]).result

    assert (sorted(outcomes), later) == (["busy", "sent"], "duplicate")
    assert len(slack_server.requests) == 1
    assert [d["outcome"] for _, _, d in _audit("slack_notify")] == ["sent"]
