"""Ops takeover in the admin: the live conversation page and what it shares with the staff WebSocket.

Staff watch one end user's conversation at ``admin/conversations/enduser/<pk>/live/``. The page
connects to ``/ws/staff/users/<end user pk>/`` with the admin session cookie. ``StaffConsumer``
(in ``conversations.consumers``)
joins the end user's channel-layer group (every event the user's widget gets, plus the staff-only
ones such as ``seen``) and a staff group of its own (``staff.user.<pk>``: escalation changes, which
the widget must not see). Staff frames call the hand-off services (``conversations.handoff``); those
publish ``human_joined`` / ``human_message`` / ``bot_back`` to the user's widget themselves.

Permissions: watching needs an active staff account with the ``view_enduser`` permission (the
same as the admin page); acting (reply, claim, release, hand back, typing) also needs
``change_escalation`` (the same as the escalation admin's reply form). The services then decide
who may act on a claimed escalation (its holder or a superuser).
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html

from .handoff import (
    STAFF_REPLY_MAX_CHARS,
    staff_name,
)
from .models import EndUser, Escalation, Message

RECENT_MESSAGES = 100


def staff_group(user_pk: int) -> str:
    """The group of the staff pages watching an end user: events the user's widget must not get."""
    return f"staff.user.{user_pk}"


def may_watch(staff_user: Any) -> bool:
    """Whether an account may watch conversations live (the admin page and the staff WebSocket)."""
    return bool(
        staff_user is not None
        and staff_user.is_authenticated
        and staff_user.is_active
        and staff_user.is_staff
        and staff_user.has_perm("conversations.view_enduser")
    )


def may_act(staff_user: Any) -> bool:
    """Whether an account may reply, claim, release and hand back from the live page."""
    return may_watch(staff_user) and staff_user.has_perm("conversations.change_escalation")


def live_link(*, user_pk: int) -> str:
    url = reverse("admin:conversations_enduser_live", args=[user_pk])
    return format_html('<a href="{}">Live view</a>', url)


def escalations_for_staff(*, user_pk: int, staff_user: Any) -> list[dict[str, Any]]:
    """The end user's unresolved escalations as the live page shows them, oldest first.

    ``held_by_me`` says whether ``staff_user`` may reply in the thread; ``may_act`` whether they may
    release it or hand it back (its holder, anyone while it is open, or a superuser).
    """
    rows = (
        Escalation.objects.filter(user_id=user_pk)
        .exclude(status=Escalation.Status.RESOLVED)
        .select_related("thread", "holder")
        .order_by("created_at")
    )
    superuser = bool(getattr(staff_user, "is_superuser", False))
    return [
        {
            "id": escalation.pk,
            "thread_id": str(escalation.thread_id),
            "topic": escalation.thread.topic[:200],
            "status": escalation.status,
            "reason": escalation.reason[:300],
            "holder": staff_name(escalation.holder) if escalation.holder else None,
            "held_by_me": escalation.status == Escalation.Status.CLAIMED
            and escalation.holder_id == staff_user.pk,
            "may_act": escalation.holder_id in (None, staff_user.pk) or superuser,
            "created_at": escalation.created_at.isoformat(),
            "claimed_at": escalation.claimed_at.isoformat() if escalation.claimed_at else None,
        }
        for escalation in rows
    ]


def live_page(request: HttpRequest, *, end_user: EndUser, admin_context: dict[str, Any]) -> HttpResponse:
    """The live conversation page: the latest messages from the database; live.js does the rest."""
    recent = list(
        Message.objects.filter(user=end_user)
        .select_related("thread")
        .order_by("-created_at", "-id")[:RECENT_MESSAGES]
    )[::-1]
    context = {
        **admin_context,
        "title": f"Live conversation: {end_user.external_id}",
        "end_user": end_user,
        "recent_messages": recent,
        "escalations": escalations_for_staff(user_pk=end_user.pk, staff_user=request.user),
        "live_config": {
            "wsPath": f"/ws/staff/users/{end_user.pk}/",
            "userPk": end_user.pk,
            "maxChars": STAFF_REPLY_MAX_CHARS,
            "mayAct": may_act(request.user),
            "timeZone": timezone.get_current_timezone_name(),
        },
    }
    return TemplateResponse(request, "admin/conversations/enduser/live.html", context)
