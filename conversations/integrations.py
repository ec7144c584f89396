"""What the outside world is told, recorded once: Slack notices and Jira issues in the audit trail.

A Slack notice is about one target (an escalation, or a failed user message) and is posted at most
once: ``notice_deliver`` holds a PostgreSQL advisory lock on the target while it posts, and a
``slack_notify`` audit row with outcome ``sent`` marks it delivered, so a job that runs twice (a
redelivered task, a retry racing a late success) does not post it again. Every attempt's outcome
(``sent``, ``retry``, ``failed``, ``rejected``) is an audit row. Jira issues are audit rows
(``jira_issue``) carrying the issue key, whether the LLM's tool or a staff member created them.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from typing import Any

from django.db import connection, models, transaction

from agentflow.integrations.http import HttpResult

from .audit import audit_record
from .models import AuditEvent, Escalation, Message, StaffUser, Thread
from .summaries import extractive_summary

NOTICE_LOCK_CLASS = 7_310_421  # the first key of the advisory lock: Slack notices
TRANSCRIPT_MESSAGES = 40
TRANSCRIPT_MESSAGE_CHARS = 1000


def escalation_for_message(*, message_id: Any) -> Escalation | None:
    """The escalation a user message's turn opened, else its thread's unresolved one."""
    escalation = Escalation.objects.filter(message_id=message_id).order_by("-created_at").first()
    if escalation is not None:
        return escalation
    thread_id = Message.objects.filter(pk=message_id).values_list("thread_id", flat=True).first()
    if thread_id is None:
        return None
    return (
        Escalation.objects.filter(thread_id=thread_id)
        .exclude(status=Escalation.Status.RESOLVED)
        .order_by("-created_at")
        .first()
    )


def notice_delivered(*, target: models.Model) -> bool:
    """Whether a Slack notice about ``target`` was posted."""
    return AuditEvent.objects.filter(
        action=AuditEvent.Action.SLACK_NOTIFY,
        target_type=target._meta.model_name or "",
        target_id=str(target.pk),
        detail__outcome="sent",
    ).exists()


def notice_deliver(
    *,
    target: models.Model,
    event: str,
    end_user_pk: int,
    attempt: int,
    final: bool,
    send: Callable[[], HttpResult],
) -> tuple[str, HttpResult | None]:
    """Post a Slack notice about ``target`` unless it was posted, and record the outcome.

    Args:
        target: the escalation or the failed message the notice is about.
        event: ``escalation`` or ``failure``.
        end_user_pk: the end user concerned (the audit row's subject).
        attempt: 0 for the first try, then each retry's number.
        final: no retry follows a transient failure of this attempt.
        send: posts once and returns the response.

    Returns:
        ``(outcome, response)``: ``sent``, ``retry`` (transient, try again), ``failed`` (transient,
        no tries left), ``rejected`` (a 4xx: never retried), or ``duplicate`` / ``busy`` (posted
        already / being posted by another run) with no response.
    """
    key = zlib.crc32(f"{target._meta.model_name}:{target.pk}".encode()) - 2**31
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_try_advisory_xact_lock(%s, %s)", [NOTICE_LOCK_CLASS, key])
            if not cursor.fetchone()[0]:
                return "busy", None
        if notice_delivered(target=target):
            return "duplicate", None
        response = send()
        if response.ok:
            outcome = "sent"
        elif not response.transient:
            outcome = "rejected"
        else:
            outcome = "failed" if final else "retry"
        audit_record(
            action=AuditEvent.Action.SLACK_NOTIFY,
            target=target,
            end_user_pk=end_user_pk,
            detail={
                "event": event,
                "outcome": outcome,
                "status": response.status,
                "attempt": attempt + 1,
                **({} if response.ok else {"error": response.describe()[:300]}),
            },
        )
    return outcome, response


def jira_issue_record(
    *,
    detail: dict[str, Any],
    via: str,
    thread_id: Any,
    end_user_pk: int | None = None,
    subject: str = "",
    staff_user: StaffUser | None = None,
) -> AuditEvent:
    """Record a Jira issue creation (or its failure): the key, who asked (``via``) and the thread."""
    return audit_record(
        action=AuditEvent.Action.JIRA_ISSUE,
        staff_user=staff_user,
        target_type="thread",
        target_id=str(thread_id),
        end_user_pk=end_user_pk,
        subject=subject,
        detail={**detail, "via": via},
    )


def thread_issue_text(*, thread: Thread) -> tuple[str, str]:
    """A Jira summary and description for a thread: its topic, its gist and its latest messages."""
    messages = list(
        Message.objects.filter(thread=thread)
        .exclude(role=Message.Role.SYSTEM)
        .order_by("-created_at")[:TRANSCRIPT_MESSAGES]
    )[::-1]
    who = {"user": "User", "assistant": "Assistant", "human_agent": "Human agent"}
    transcript = "\n\n".join(
        f"[{m.created_at:%Y-%m-%d %H:%M} UTC] {who.get(m.role, m.role)}: {m.content[:TRANSCRIPT_MESSAGE_CHARS]}"
        for m in messages
    )
    topic = " ".join((thread.topic or "Support conversation").split())
    summary = f"[{thread.user.agent.name}] {topic}"
    description = (
        f"Conversation with user {thread.user.external_id} (thread {thread.pk}, {thread.status}"
        f"{', intent ' + thread.intent if thread.intent else ''}).\n\n"
        f"Summary:\n{extractive_summary(messages)}\n\nTranscript (latest {len(messages)} messages):\n\n{transcript}"
    )
    return summary, description
