"""What the hand-off inbox shows: its rows and, for the selected escalation, the conversation beside it.

Reads only (the writes are the hand-off services in ``conversations.handoff``). The rows are the
unresolved escalations a staff member should look at: the open ones (nobody holds them), the ones they
hold, and the ones another staff member holds while the user waits for an answer (the user wrote
last). Each row carries its SLA state: how long the user has waited for a human, against the
thresholds in ``AGENTFLOW_INBOX_SLA_MINUTES`` (warn, breach; default 5 and 15 minutes).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django.apps import apps
from django.conf import settings
from django.db.models import OuterRef, Q, QuerySet, Subquery
from django.utils import timezone

from ..handoff import staff_name
from ..models import CannedReply, Escalation, Message, Thread

SHOW = ("all", "open", "mine", "waiting")
MAX_ROWS = 200
DEFAULT_SLA_MINUTES = (5.0, 15.0)


def sla_minutes() -> tuple[float, float]:
    """The (warn, breach) thresholds in minutes, from settings; bad values fall back to the default."""
    value = getattr(settings, "AGENTFLOW_INBOX_SLA_MINUTES", DEFAULT_SLA_MINUTES)
    try:
        warn, breach = (float(v) for v in value)
    except (TypeError, ValueError):
        return DEFAULT_SLA_MINUTES
    if not 0 < warn <= breach:
        return DEFAULT_SLA_MINUTES
    return warn, breach


def sla_state(*, waited_seconds: float) -> str:
    """``ok``, ``warn`` or ``breach`` for a user who has waited this long for a human."""
    warn, breach = sla_minutes()
    if waited_seconds >= breach * 60:
        return "breach"
    if waited_seconds >= warn * 60:
        return "warn"
    return "ok"


def reason_label(escalation: Escalation) -> str:
    """The escalation's reason, made specific with the triggering message's intent and confidence.

    Some reasons are the same on every row (offline mode, an LLM outage); the message that asked
    for a human says more, so its classification is added unless the reason already names it.
    """
    reason = escalation.reason.strip() or "no reason recorded"
    message = escalation.message
    if message is not None and message.intent and message.intent not in reason:
        confidence = f" at {message.confidence:.2f}" if message.confidence is not None else ""
        reason = f"{reason} (intent {message.intent}{confidence})"
    return reason


def _last_role() -> Subquery:
    latest = Message.objects.filter(thread=OuterRef("thread")).order_by("-created_at", "-id").values("role")
    return Subquery(latest[:1])


def _unresolved() -> QuerySet[Escalation]:
    return (
        Escalation.objects.exclude(status=Escalation.Status.RESOLVED)
        .select_related("thread", "user__agent", "holder", "message")
        .annotate(last_role=_last_role())
    )


def _trigger(escalation: Escalation) -> Message | None:
    """The user message that asked for a human: the one recorded, else the thread's latest before it."""
    if escalation.message is not None:
        return escalation.message
    return (
        Message.objects.filter(
            thread_id=escalation.thread_id, role=Message.Role.USER, created_at__lte=escalation.created_at
        )
        .order_by("-created_at")
        .first()
    )


def inbox_row(escalation: Escalation, *, staff_user: Any, now: datetime) -> dict[str, Any]:
    """One row of the inbox (``escalation`` comes from ``_unresolved()``: it carries ``last_role``)."""
    trigger = _trigger(escalation)
    mine = escalation.status == Escalation.Status.CLAIMED and escalation.holder_id == staff_user.pk
    waiting = (
        escalation.status == Escalation.Status.CLAIMED and getattr(escalation, "last_role", "") == "user"
    )
    waited = (now - escalation.created_at).total_seconds()
    return {
        "id": escalation.pk,
        "status": escalation.status,
        "user": escalation.user.external_id,
        "user_pk": escalation.user_id,
        "agent": escalation.user.agent.name,
        "thread_id": str(escalation.thread_id),
        "topic": escalation.thread.topic,
        "trigger": trigger.content if trigger is not None else "",
        "reason": reason_label(escalation),
        "holder": staff_name(escalation.holder) if escalation.holder else "",
        "mine": mine,
        "waiting": waiting,
        "created_at": escalation.created_at,
        "claimed_at": escalation.claimed_at,
        "since": escalation.claimed_at or escalation.created_at,
        "age_seconds": int(waited),
        # A claimed thread has a human: the clock that matters is the open one (and a waiting user).
        "sla": sla_state(waited_seconds=waited)
        if escalation.status == Escalation.Status.OPEN or waiting
        else "held",
    }


def inbox_rows(*, staff_user: Any, show: str = "all", now: datetime | None = None) -> list[dict[str, Any]]:
    """The inbox's rows, the longest-waiting first.

    Args:
        staff_user: who is looking (for "mine").
        show: ``open``, ``mine``, ``waiting`` or ``all`` (the three together).
        now: the time ages are measured at.
    """
    now = now or timezone.now()
    open_ = Q(status=Escalation.Status.OPEN)
    mine = Q(status=Escalation.Status.CLAIMED, holder=staff_user)
    waiting = Q(status=Escalation.Status.CLAIMED, last_role=Message.Role.USER)
    condition = {"open": open_, "mine": mine, "waiting": waiting}.get(show, open_ | mine | waiting)
    rows = _unresolved().filter(condition).order_by("created_at", "pk")[:MAX_ROWS]
    return [inbox_row(escalation, staff_user=staff_user, now=now) for escalation in rows]


def inbox_counts(*, staff_user: Any) -> dict[str, int]:
    """How many rows each filter of the inbox has."""
    base = _unresolved()
    return {
        "open": base.filter(status=Escalation.Status.OPEN).count(),
        "mine": base.filter(status=Escalation.Status.CLAIMED, holder=staff_user).count(),
        "waiting": base.filter(Q(status=Escalation.Status.CLAIMED, last_role=Message.Role.USER)).count(),
    }


def inbox_row_by_id(*, escalation_id: int, staff_user: Any) -> dict[str, Any] | None:
    """The row of one unresolved escalation (for the live alert), or None once it is resolved."""
    escalation = _unresolved().filter(pk=escalation_id).first()
    return None if escalation is None else inbox_row(escalation, staff_user=staff_user, now=timezone.now())


def row_payload(row: dict[str, Any]) -> dict[str, Any]:
    """A row as plain JSON types (for the staff WebSocket)."""
    return {key: value.isoformat() if isinstance(value, datetime) else value for key, value in row.items()}


def _memories(*, user_pk: int) -> list[Any]:
    """The end user's memories, when the memory app is installed.

    Looked up by name: ``memory`` builds on ``conversations``, so this app never imports it.
    """
    if not apps.is_installed("memory"):
        return []
    memory = apps.get_model("memory", "Memory")
    return list(memory.objects.filter(user_id=user_pk).order_by("-created_at")[:20])


def inbox_detail(*, escalation: Escalation, staff_user: Any) -> dict[str, Any]:
    """The selected escalation's conversation, the user's other threads, memories and canned replies."""
    messages = list(Message.objects.filter(thread_id=escalation.thread_id).order_by("created_at", "id")[:300])
    other_threads = list(
        Thread.objects.filter(user_id=escalation.user_id)
        .exclude(pk=escalation.thread_id)
        .order_by("-last_activity_at")[:10]
    )
    canned = list(
        CannedReply.objects.filter(Q(agent__isnull=True) | Q(agent_id=escalation.user.agent_id)).order_by(
            "position", "title"
        )[:30]
    )
    superuser = bool(getattr(staff_user, "is_superuser", False))
    claimed = escalation.status == Escalation.Status.CLAIMED
    holds = claimed and (escalation.holder_id == staff_user.pk or superuser)
    unresolved = escalation.status != Escalation.Status.RESOLVED
    return {
        "reason": reason_label(escalation),
        "actions": [  # (action, label, allowed, key)
            ("claim", "Claim", escalation.status == Escalation.Status.OPEN, "c"),
            ("release", "Release", holds, "u"),
            ("hand_back", "Hand back to the bot", unresolved and (not claimed or holds), "b"),
            ("resolve", "Resolve", unresolved and (not claimed or holds), "x"),
        ],
        "escalation": escalation,
        "messages": messages,
        "trigger_id": getattr(_trigger(escalation), "pk", None),
        "other_threads": other_threads,
        "memories": _memories(user_pk=escalation.user_id),
        "canned": canned,
        "can_reply": claimed and escalation.holder_id == staff_user.pk,
    }
