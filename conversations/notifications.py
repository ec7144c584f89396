"""The Slack notice job: an escalation (or a failed turn) posted to the agent's webhook once.

Queued on commit by the turn pipeline (``agentflow.pipeline.notify_slack``) with the user
message's id and the event. The job builds the agent as this process runs it (the registry: the
webhook URL is a secret, never on the queue), posts once per run and records every outcome in the
audit trail (``conversations.integrations.notice_deliver``). Transient failures (no response,
429, 5xx) are retried by Celery with exponential backoff, or after the Retry-After the webhook
asked for; a 4xx is final. A notice already posted is never posted again, however often the job
runs. Imported by ``conversations.tasks`` so that workers register it.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery import shared_task
from django.db import connections

from agentflow.errors import AgentUnavailable
from agentflow.integrations import slack
from agentflow.integrations.http import retry_delay
from agentflow.integrations.settings import slack_settings
from agentflow.outbound import slack_notice
from agentflow.pipeline import NOTIFY_TASK
from agentflow.registry import agent_for

from .integrations import notice_deliver
from .models import Message

logger = logging.getLogger("agentflow.integrations")

MAX_DELAY = 300.0  # the longest wait between retries, whatever Retry-After says


def _agent_of(message_id: str) -> Any:
    row = (
        Message.objects.filter(pk=message_id, role=Message.Role.USER)
        .values("user__agent__name", "user__agent__version")
        .first()
    )
    if row is None:
        return None
    return agent_for(row["user__agent__name"], version=row["user__agent__version"])


def _attempt(message_id: str, event: str, attempt: int) -> tuple[str, float]:
    """One run: ``(outcome, seconds before the next try)``; the delay only matters for ``retry``."""
    try:
        agent = _agent_of(message_id)
    except AgentUnavailable as exc:
        logger.warning("Slack notice of message %s skipped: %s", message_id, exc)
        return "skipped", 0.0
    if agent is None:
        return "missing", 0.0
    settings = slack_settings(agent.config.tools_config)
    if settings is None or event not in settings.notify_on:
        return "off", 0.0
    built = slack_notice(agent, settings, message_id=message_id, event=event)
    if built is None:
        return "missing", 0.0
    target, end_user_pk, notice = built
    outcome, response = notice_deliver(
        target=target,
        event=event,
        end_user_pk=end_user_pk,
        attempt=attempt,
        final=attempt >= settings.max_retries,
        send=lambda: slack.send(settings, notice),
    )
    if response is not None and not response.ok:
        logger.warning("Slack notice of %s %s: %s (%s)", event, target.pk, outcome, response.describe())
    delay = 0.0
    if outcome == "retry" and response is not None:
        delay = retry_delay(response, attempt=attempt, backoff=settings.retry_backoff_seconds, cap=MAX_DELAY)
    return outcome, delay


@shared_task(name=NOTIFY_TASK, bind=True, acks_late=True, max_retries=None, ignore_result=True)
def notify_slack(self: Any, message_id: str, event: str, attempt: int = 0) -> str:
    """Post the Slack notice of ``event`` (``escalation`` or ``failure``) about a user message."""
    try:
        while True:
            outcome, delay = _attempt(message_id, event, attempt)
            if outcome != "retry":
                return outcome
            if not self.request.is_eager:
                raise self.retry(countdown=delay, args=(message_id, event, attempt + 1))
            time.sleep(delay)  # run in this process (inline jobs): no queue to wait on
            attempt += 1
    finally:
        connections.close_all()
