"""Jira issues over its REST API (``POST {server_url}/rest/api/2/issue``), and the LLM's tool for it.

``create_issue`` makes one issue in the configured project (summary, description, issue type),
retrying transient failures (connection errors, 429 with Retry-After, 5xx) with backoff and never a
4xx (Jira's own error messages are passed on). ``JiraToolSource`` offers it to the LLM as
``create_ticket``; the issue key comes back as the tool's result, so the reply can quote it.
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..tools import ToolSource
from .http import HttpResult, post_with_retries
from .settings import JiraSettings

logger = logging.getLogger("agentflow.integrations")

TOOL_NAME = "create_ticket"
SUMMARY_MAX = 255  # Jira's limit for a summary
DESCRIPTION_MAX = 30_000  # under Jira's 32,767 characters for a text field
TOOL_SPEC = {
    "name": TOOL_NAME,
    "description": (
        "Create a ticket in the support team's issue tracker (Jira) for a problem that needs follow-up "
        "by the team (a bug, an outage, a request you cannot fulfil). Returns the ticket's key; tell "
        "the user the key. Do not create a ticket for a question you can answer."
    ),
    "input_schema": {
        "type": "object",
        "properties": {
            "summary": {"type": "string", "description": "One line: what is wrong or needed."},
            "description": {
                "type": "string",
                "description": "Details: what the user reported, steps, impact.",
            },
        },
        "required": ["summary"],
    },
}


@dataclass(frozen=True)
class IssueResult:
    """The outcome of ``create_issue``: the key (None on failure), its browse URL, the last response."""

    key: str | None
    url: str
    response: HttpResult
    attempts: int

    def detail(self) -> dict[str, Any]:
        """Facts for an audit row."""
        return {
            "outcome": "created" if self.key else "failed",
            "issue_key": self.key or "",
            "status": self.response.status,
            "attempts": self.attempts,
            **({} if self.key else {"error": self.response.describe()[:300]}),
        }


def auth_headers(settings: JiraSettings) -> dict[str, str]:
    """The Authorization header: a bearer token (Data Center PAT) or basic email:token (Cloud)."""
    if settings.auth == "basic":
        pair = f"{settings.email}:{settings.auth_token}".encode()
        return {"Authorization": "Basic " + base64.b64encode(pair).decode()}
    return {"Authorization": f"Bearer {settings.auth_token}"}


def issue_body(settings: JiraSettings, *, summary: str, description: str) -> dict[str, Any]:
    """The create-issue request body (REST API v2: the description is plain text)."""
    one_line = " ".join(summary.split())[:SUMMARY_MAX]
    return {
        "fields": {
            "project": {"key": settings.project_key},
            "summary": one_line,
            "description": description[:DESCRIPTION_MAX],
            "issuetype": {"name": settings.issue_type},
        }
    }


def create_issue(
    settings: JiraSettings, *, summary: str, description: str, sleep: Callable[[float], None] | None = None
) -> IssueResult:
    """Create one issue. Blocking (call it off the event loop). Never raises for HTTP failures."""
    extra = {"sleep": sleep} if sleep is not None else {}
    response, attempts = post_with_retries(
        f"{settings.server_url}/rest/api/2/issue",
        issue_body(settings, summary=summary, description=description),
        headers=auth_headers(settings),
        timeout=settings.timeout_seconds,
        max_retries=settings.max_retries,
        backoff=settings.retry_backoff_seconds,
        cap=10.0,
        **extra,
    )
    data = response.json() if response.ok else None
    key = data.get("key") if isinstance(data, dict) and isinstance(data.get("key"), str) else None
    if response.ok and key is None:
        response = HttpResult(response.status, response.body, error="no issue key in Jira's answer")
    url = f"{settings.server_url}/browse/{key}" if key else ""
    if key is None:
        logger.warning("Jira issue not created after %s attempt(s): %s", attempts, response.describe())
    return IssueResult(key, url, response, attempts)


#: Called in the worker thread after each ``create_ticket`` call, with its result and arguments.
OnIssue = Callable[[IssueResult, dict[str, Any]], None]


class JiraToolSource(ToolSource):
    """The ``create_ticket`` tool, backed by ``create_issue``."""

    def __init__(self, settings: JiraSettings, *, on_issue: OnIssue | None = None) -> None:
        self.settings = settings
        self._on_issue = on_issue

    async def list_tools(self) -> list[dict[str, Any]]:
        return [TOOL_SPEC]

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        if name != TOOL_NAME:
            return f"unknown tool {name}", True
        summary = arguments.get("summary")
        description = arguments.get("description", "")
        if not isinstance(summary, str) or not summary.strip():
            return "create_ticket needs a non-empty 'summary' string", True
        if not isinstance(description, str):
            return "'description' must be a string", True
        return await asyncio.to_thread(self._create, summary, description)

    def _create(self, summary: str, description: str) -> tuple[str, bool]:
        result = create_issue(self.settings, summary=summary, description=description)
        if self._on_issue is not None:
            try:
                self._on_issue(result, {"summary": summary[:SUMMARY_MAX]})
            except Exception:  # the audit row must not turn a created issue into a failed tool call
                logger.exception("recording Jira issue %s failed", result.key)
        if result.key:
            return f"Created ticket {result.key} ({result.url}).", False
        return f"The ticket could not be created ({result.response.describe()}).", True
