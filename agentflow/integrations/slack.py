"""Slack incoming-webhook messages: an escalation (a thread handed to a human) and a failed turn.

The message has a ``text`` (notifications, clients without blocks) and ``blocks`` (header, facts,
reason, the user's message excerpt, a button to the admin page when its base URL is configured).
User-supplied text is escaped for Slack's mrkdwn (``&``, ``<``, ``>``), so a message cannot
smuggle a link or a mention into the channel.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .http import HttpResult, post_json
from .settings import SlackSettings


@dataclass(frozen=True)
class Notice:
    """What a post is about. ``excerpt`` is already cut and scrubbed as configured."""

    event: str  # "escalation" or "failure"
    agent: str
    user: str
    reason: str
    excerpt: str = ""
    intent: str = ""
    thread_topic: str = ""
    link: str = ""


TITLES = {"escalation": "Handed to a human", "failure": "A turn failed"}


def escape(text: str) -> str:
    """Slack mrkdwn escaping of user text (its three control characters)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _quote(text: str) -> str:
    return "\n".join(f">{line}" for line in escape(text).splitlines() or [""])


def payload(notice: Notice) -> dict[str, Any]:
    """The webhook's JSON body for ``notice``."""
    title = TITLES.get(notice.event, notice.event)
    text = f"{title}: agent {notice.agent}, user {notice.user}: {notice.reason}"
    fields = [
        {"type": "mrkdwn", "text": f"*Agent*\n{escape(notice.agent)}"},
        {"type": "mrkdwn", "text": f"*User*\n{escape(notice.user)}"},
    ]
    if notice.intent:
        fields.append({"type": "mrkdwn", "text": f"*Intent*\n{escape(notice.intent)}"})
    if notice.thread_topic:
        fields.append({"type": "mrkdwn", "text": f"*Thread*\n{escape(notice.thread_topic)}"})
    blocks: list[dict[str, Any]] = [
        {"type": "header", "text": {"type": "plain_text", "text": title}},
        {"type": "section", "fields": fields},
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*Reason*\n{escape(notice.reason or '-')}"}},
    ]
    if notice.excerpt:
        blocks.append(
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*Message*\n{_quote(notice.excerpt)}"}}
        )
    if notice.link:
        blocks.append(
            {
                "type": "actions",
                "elements": [
                    {
                        "type": "button",
                        "text": {"type": "plain_text", "text": "Open in the admin"},
                        "url": notice.link,
                    }
                ],
            }
        )
    return {"text": escape(text)[:3000], "blocks": blocks}


def send(settings: SlackSettings, notice: Notice) -> HttpResult:
    """Post ``notice`` once (the caller retries: a Celery job, with backoff)."""
    body = payload(notice)
    if settings.channel:
        body["channel"] = settings.channel
    return post_json(settings.webhook_url, body, timeout=settings.timeout_seconds)
