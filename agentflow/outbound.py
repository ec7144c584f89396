"""The runtime's side of the integrations: what an agent's turns send to Slack and Jira.

- ``slack_notice``: after a turn opens an escalation (``pipeline.finish``) or fails
  (``pipeline.fail``), the pipeline queues the ``agentflow.notify_slack`` job on commit when the
  agent's ``slack_integration`` asks for that event; the job (``conversations.notifications``) builds
  the notice here and posts it once (``conversations.integrations.notice_deliver``).
- ``jira_tool``: the ``create_ticket`` tool the builder adds to the agent's tools when
  ``jira_integration`` is complete; each call is recorded in the audit trail.
- ``thread_jira_issue``: the staff action's issue for a whole thread.

The job and the action read the integration settings from the agent as their process builds it
(the registry): secrets are never stored with the agent's record nor put on the queue.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from django.db import connections
from django.urls import NoReverseMatch, reverse

from conversations import integrations as conv_integrations
from conversations.models import Escalation, Message, StaffUser, Thread
from memory.scrub import scrub_personal_data

from .config import AgentFrameworkConfig
from .context import current_turn
from .integrations import jira as jira_api
from .integrations.settings import JiraSettings, SlackSettings, jira_settings
from .integrations.slack import Notice

if TYPE_CHECKING:
    from .agent import Agent

logger = logging.getLogger("agentflow.integrations")

WITHHELD_MARK = "; withheld draft:"  # how agentflow.agent words a reply withheld for low confidence


def _excerpt(settings: SlackSettings, text: str) -> str:
    if settings.excerpt == "none":
        return ""
    if settings.excerpt == "scrubbed":
        # The pattern scrubber (emails, phones, cards, credentials, ids, introduced names); the NER
        # model is not loaded for a notice.
        text = scrub_personal_data(text, ner=False)
    text = " ".join(text.split())
    limit = settings.excerpt_chars
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _reason(settings: SlackSettings, reason: str) -> str:
    """The hand-off reason as the post shows it: it may quote the withheld draft, which quotes the user."""
    if settings.excerpt == "none":
        reason = reason.split(WITHHELD_MARK, 1)[0]
    elif settings.excerpt == "scrubbed":
        reason = scrub_personal_data(reason, ner=False)
    return reason[:500]


def _admin_link(settings: SlackSettings, target: Escalation | Message) -> str:
    if not settings.admin_base_url:
        return ""
    name = "escalation" if isinstance(target, Escalation) else "message"
    try:
        path = reverse(f"admin:conversations_{name}_change", args=[target.pk])
    except NoReverseMatch:  # the host project has no admin
        return ""
    return settings.admin_base_url + path


def slack_notice(
    agent: Agent, settings: SlackSettings, *, message_id: Any, event: str
) -> tuple[Escalation | Message, int, Notice] | None:
    """The target, its end user and the notice of ``event`` about user message ``message_id``.

    None when there is nothing to tell (the message, or its escalation, no longer exists).
    """
    message = Message.objects.select_related("user", "thread").filter(pk=message_id).first()
    if message is None:
        return None
    target: Escalation | Message
    if event == "escalation":
        escalation = conv_integrations.escalation_for_message(message_id=message.pk)
        if escalation is None:
            return None
        target, reason = escalation, escalation.reason
        text = escalation.message.content if escalation.message is not None else message.content
    else:
        target, reason, text = message, message.error or "the turn failed", message.content
    notice = Notice(
        event=event,
        agent=agent.name,
        user=message.user.external_id,
        reason=_reason(settings, reason),
        excerpt=_excerpt(settings, text),
        intent=message.intent,
        thread_topic=message.thread.topic[:100] if message.thread is not None else "",
        link=_admin_link(settings, target),
    )
    return target, message.user_id, notice


def _record_tool_issue(result: jira_api.IssueResult, arguments: dict[str, Any]) -> None:
    """Audit a ``create_ticket`` call (runs in the tool's worker thread, with the turn's context)."""
    ctx = current_turn()
    try:
        conv_integrations.jira_issue_record(
            detail={**result.detail(), "message_id": ctx.message_id if ctx else ""},
            via="llm_tool",
            thread_id=ctx.thread_id if ctx else "",
            subject=ctx.user_id if ctx else "",
        )
    finally:
        connections.close_all()  # this thread's connection: tool threads are reused


def jira_tool(config: AgentFrameworkConfig) -> jira_api.JiraToolSource | None:
    """The LLM's ``create_ticket`` tool, when ``jira_integration`` is complete and ``llm_tool`` is on."""
    settings = jira_settings(config.tools_config)
    if settings is None or not settings.project_key or not settings.llm_tool:
        return None
    return jira_api.JiraToolSource(settings, on_issue=_record_tool_issue)


def thread_jira_issue(
    *, settings: JiraSettings, thread: Thread, staff_user: StaffUser
) -> jira_api.IssueResult:
    """Create a Jira issue with the thread's summary and transcript, and record it (audit)."""
    summary, description = conv_integrations.thread_issue_text(thread=thread)
    result = jira_api.create_issue(settings, summary=summary, description=description)
    conv_integrations.jira_issue_record(
        detail=result.detail(),
        via="admin",
        thread_id=thread.pk,
        end_user_pk=thread.user_id,
        staff_user=staff_user,
    )
    return result
