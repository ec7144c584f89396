"""The integrations' core: settings from tools_config (secrets only through ${VAR}), the HTTP client's
retry rules, the Slack payload and Jira's create-issue call, against local fake HTTP servers."""

from __future__ import annotations

import base64
import logging
import socket
import textwrap
from collections.abc import Iterator

import pytest

from agentflow import ConfigError
from agentflow.config import resolve_config
from agentflow.integrations import jira, slack
from agentflow.integrations.http import HttpResult, post_with_retries, retry_delay
from agentflow.integrations.settings import JiraSettings, SlackSettings, jira_settings, slack_settings
from agentflow.testing.fake_http import FakeHTTPServer

ENV = {"SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/xyz", "JIRA_TOKEN": "jira-secret"}


@pytest.fixture
def server() -> Iterator[FakeHTTPServer]:
    with FakeHTTPServer() as fake:
        yield fake


def _tools(**sections: dict) -> dict:
    return {"tools_config": sections}


# --- secrets only through ${VAR} ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("slack_integration", "webhook_url", "https://hooks.slack.com/services/T0/B0/xyz"),
        ("slack_integration", "webhook_url", "${SLACK_WEBHOOK_URL:-https://hooks.slack.com/services/T/B/x}"),
        ("jira_integration", "auth_token", "jira-secret"),
        ("jira_integration", "auth_token", "Bearer ${JIRA_TOKEN}"),
    ],
)
def test_a_literal_secret_in_a_dict_is_refused_naming_the_field(section, field, value):
    block = {
        field: value,
        **({"server_url": "https://jira.example.com"} if section == "jira_integration" else {}),
    }

    with pytest.raises(ConfigError) as caught:
        resolve_config([_tools(**{section: block})], environ=ENV)

    message = str(caught.value)
    assert f"tools_config.{section}.{field}" in message and "literal secret" in message
    assert "${" in message and "environment" in message
    assert "xyz" not in message and "jira-secret" not in message  # the secret itself is never shown


def test_a_literal_secret_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            tools_config:
              jira_integration:
                server_url: "https://jira.example.com"
                auth_token: "abc123"
            """
        )
    )

    with pytest.raises(
        ConfigError, match=r"tools_config\.jira_integration\.auth_token in config file .*agent\.yaml"
    ):
        resolve_config([path], environ={})


def test_references_are_substituted_and_typed(tmp_path):
    config = resolve_config(
        [
            _tools(
                slack_integration={
                    "webhook_url": "${SLACK_WEBHOOK_URL}",
                    "notify_on": ["escalation", "failure"],
                },
                jira_integration={
                    "server_url": "https://jira.example.com/",
                    "auth_token": "${JIRA_TOKEN}",
                    "project_key": "SUP",
                },
            )
        ],
        environ=ENV,
    )

    slack_cfg = slack_settings(config.tools_config)
    jira_cfg = jira_settings(config.tools_config)
    assert slack_cfg == SlackSettings(
        webhook_url=ENV["SLACK_WEBHOOK_URL"], notify_on=("escalation", "failure")
    )
    assert (jira_cfg.server_url, jira_cfg.auth_token, jira_cfg.project_key) == (
        "https://jira.example.com",
        "jira-secret",
        "SUP",
    )


def test_a_missing_variable_turns_the_integration_off_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING):
        config = resolve_config(
            [_tools(slack_integration={"webhook_url": "${SLACK_WEBHOOK_URL}"})], environ={}
        )

    assert slack_settings(config.tools_config) is None
    text = caplog.text
    assert (
        "SLACK_WEBHOOK_URL" in text and "tools_config.slack_integration is off: webhook_url is empty" in text
    )


@pytest.mark.parametrize(
    ("sections", "error"),
    [
        (
            {"slack_integration": {"webhook_url": "${SLACK_WEBHOOK_URL}"}},
            "tools_config.slack_integration.webhook_url: Value error, must be an http(s) URL",
        ),
        (
            {"jira_integration": {"server_url": "jira.example.com", "auth_token": "${JIRA_TOKEN}"}},
            "tools_config.jira_integration.server_url: Value error, must be an http(s) URL",
        ),
        (
            {
                "jira_integration": {
                    "server_url": "https://j",
                    "auth_token": "${JIRA_TOKEN}",
                    "project_key": "sup",
                }
            },
            "tools_config.jira_integration.project_key: Value error, must be a Jira project key",
        ),
        (
            {"slack_integration": {"webhook_url": "${SLACK_WEBHOOK_URL}", "notify_on": ["everything"]}},
            "tools_config.slack_integration.notify_on.0: Input should be 'escalation' or 'failure'",
        ),
        (
            {"slack_integration": {"webhook_url": "${SLACK_WEBHOOK_URL}", "chanel": "#ops"}},
            "tools_config.slack_integration.chanel: Extra inputs are not permitted",
        ),
        (
            {"jira_integration": {"server_url": "https://j", "auth_token": "${JIRA_TOKEN}", "auth": "basic"}},
            "tools_config.jira_integration.email is required with auth: basic",
        ),
    ],
)
def test_bad_integration_settings_are_refused_naming_the_field(sections, error):
    # The first case's webhook variable holds a bad URL; the others are valid.
    bad_url = "webhook_url" in str(sections) and len(sections["slack_integration"]) == 1
    environ = {**ENV, "SLACK_WEBHOOK_URL": "not a url"} if bad_url else ENV

    with pytest.raises(ConfigError) as caught:
        resolve_config([{"tools_config": sections}], environ=environ)

    assert error in str(caught.value)
    assert "not a url" not in str(caught.value)  # a bad secret is not echoed either


# --- the HTTP client's retry rules --------------------------------------------------------------


def test_a_500_is_retried_with_backoff_then_succeeds(server):
    server.enqueue(500, "boom")
    server.enqueue(503, "busy")
    slept: list[float] = []

    result, attempts = post_with_retries(
        server.url("/hook"), {"a": 1}, timeout=5, max_retries=3, backoff=0.5, sleep=slept.append
    )

    assert (result.ok, result.status, attempts) == (True, 200, 3)
    assert slept == [0.5, 1.0]
    assert [r["json"] for r in server.requests] == [{"a": 1}] * 3


def test_a_4xx_is_never_retried(server):
    server.enqueue(400, "invalid_payload")
    slept: list[float] = []

    result, attempts = post_with_retries(
        server.url(), {}, timeout=5, max_retries=3, backoff=0.5, sleep=slept.append
    )

    assert (result.status, result.transient, attempts, slept) == (400, False, 1, [])
    assert result.describe() == "HTTP 400: invalid_payload"
    assert len(server.requests) == 1


def test_429_honours_retry_after_up_to_the_cap(server):
    server.enqueue(429, "slow down", headers={"Retry-After": "7"})
    server.enqueue(429, "slow down", headers={"Retry-After": "120"})
    slept: list[float] = []

    result, attempts = post_with_retries(
        server.url(), {}, timeout=5, max_retries=2, backoff=0.5, cap=30, sleep=slept.append
    )

    assert (result.status, attempts) == (200, 3)
    assert slept == [7.0, 30.0]


def test_no_response_is_transient_and_gives_up_after_the_retries():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    slept: list[float] = []

    result, attempts = post_with_retries(
        f"http://127.0.0.1:{port}/hook", {}, timeout=2, max_retries=2, backoff=0.25, sleep=slept.append
    )

    assert (result.status, result.transient, attempts, slept) == (None, True, 3, [0.25, 0.5])
    assert result.describe().startswith("no response:")


def test_a_slow_server_times_out(server):
    server.enqueue(200, "late", delay=3)

    result, attempts = post_with_retries(server.url(), {}, timeout=0.3, max_retries=0, backoff=0.1)

    assert (result.status, result.transient, attempts) == (None, True, 1)
    assert "timed out" in result.error


def test_retry_delay_is_exponential_without_retry_after():
    no_answer = HttpResult(None, error="refused")
    assert [retry_delay(no_answer, attempt=a, backoff=1, cap=5) for a in range(5)] == [1, 2, 4, 5, 5]


# --- Slack's payload ------------------------------------------------------------------------------


def test_the_slack_payload_has_text_and_blocks_with_the_facts_escaped(server):
    notice = slack.Notice(
        event="escalation",
        agent="support",
        user="alice",
        reason="intent ESCALATION is always handed to a human",
        excerpt="I want a manager <@U123> & now",
        intent="ESCALATION",
        thread_topic="Refund",
        link="https://ops.example.com/admin/conversations/escalation/7/change/",
    )
    settings = SlackSettings(webhook_url=server.url("/services/T/B/x"))

    result = slack.send(settings, notice)

    assert result.ok
    [request] = server.requests
    assert request["path"] == "/services/T/B/x"
    assert request["headers"]["content-type"] == "application/json; charset=utf-8"
    body = request["json"]
    assert (
        body["text"]
        == "Handed to a human: agent support, user alice: intent ESCALATION is always handed to a human"
    )
    assert body["blocks"] == [
        {"type": "header", "text": {"type": "plain_text", "text": "Handed to a human"}},
        {
            "type": "section",
            "fields": [
                {"type": "mrkdwn", "text": "*Agent*\nsupport"},
                {"type": "mrkdwn", "text": "*User*\nalice"},
                {"type": "mrkdwn", "text": "*Intent*\nESCALATION"},
                {"type": "mrkdwn", "text": "*Thread*\nRefund"},
            ],
        },
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": "*Reason*\nintent ESCALATION is always handed to a human"},
        },
        {
            "type": "section",
            "text": {"type": "mrkdwn", "text": "*Message*\n>I want a manager &lt;@U123&gt; &amp; now"},
        },
        {
            "type": "actions",
            "elements": [
                {
                    "type": "button",
                    "text": {"type": "plain_text", "text": "Open in the admin"},
                    "url": "https://ops.example.com/admin/conversations/escalation/7/change/",
                }
            ],
        },
    ]


# --- Jira ---------------------------------------------------------------------------------------


def _jira(server: FakeHTTPServer, **extra) -> JiraSettings:
    return JiraSettings(server_url=server.url(), auth_token="tok-123", project_key="SUP", **extra)


def test_create_issue_posts_the_fields_with_a_bearer_token(server):
    server.enqueue(201, {"id": "10001", "key": "SUP-7", "self": server.url("/rest/api/2/issue/10001")})

    result = jira.create_issue(
        _jira(server, issue_type="Bug"), summary="Login\nbroken", description="Details"
    )

    assert (result.key, result.url, result.attempts) == ("SUP-7", server.url("/browse/SUP-7"), 1)
    [request] = server.requests
    assert request["path"] == "/rest/api/2/issue"
    assert request["headers"]["authorization"] == "Bearer tok-123"
    assert request["json"] == {
        "fields": {
            "project": {"key": "SUP"},
            "summary": "Login broken",
            "description": "Details",
            "issuetype": {"name": "Bug"},
        }
    }


def test_create_issue_with_basic_auth_for_jira_cloud(server):
    server.enqueue(201, {"key": "SUP-8"})

    result = jira.create_issue(
        _jira(server, auth="basic", email="bot@example.com"), summary="s", description=""
    )

    assert result.key == "SUP-8"
    expected = base64.b64encode(b"bot@example.com:tok-123").decode()
    assert server.requests[0]["headers"]["authorization"] == f"Basic {expected}"


def test_create_issue_retries_a_502_but_not_a_400(server):
    server.enqueue(502, "bad gateway")
    server.enqueue(201, {"key": "SUP-9"})
    slept: list[float] = []
    assert jira.create_issue(_jira(server), summary="s", description="", sleep=slept.append).key == "SUP-9"
    assert (len(server.requests), slept) == (2, [0.5])

    server.reset()
    server.enqueue(400, {"errorMessages": [], "errors": {"issuetype": "issue type is required"}})
    failed = jira.create_issue(_jira(server), summary="s", description="", sleep=slept.append)
    assert failed.key is None and len(server.requests) == 1
    assert failed.detail() == {
        "outcome": "failed",
        "issue_key": "",
        "status": 400,
        "attempts": 1,
        "error": 'HTTP 400: {"errorMessages": [], "errors": {"issuetype": "issue type is required"}}',
    }


async def test_the_tool_refuses_bad_arguments_without_calling_jira(server):
    source = jira.JiraToolSource(_jira(server))

    assert await source.list_tools() == [jira.TOOL_SPEC]
    assert await source.call_tool("create_ticket", {}) == (
        "create_ticket needs a non-empty 'summary' string",
        True,
    )
    assert await source.call_tool("create_ticket", {"summary": "x", "description": 3}) == (
        "'description' must be a string",
        True,
    )
    assert await source.call_tool("delete_everything", {"summary": "x"}) == (
        "unknown tool delete_everything",
        True,
    )
    assert server.requests == []
