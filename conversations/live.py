"""Ops takeover in the admin: the staff WebSocket and the live conversation page.

Staff watch one end user's conversation at ``admin/conversations/enduser/<pk>/live/``. The page
connects to ``/ws/staff/users/<end user pk>/`` with the admin session cookie. ``StaffConsumer``
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

from functools import partialmethod
from typing import Any

from channels.db import database_sync_to_async
from django.contrib.auth import get_user_model
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils.html import format_html

from agentflow.errors import InvalidInput, NotFound

from .audit import audit_scope
from .events import apublish, user_group
from .frames import JsonFrameConsumer
from .handoff import (
    STAFF_REPLY_MAX_CHARS,
    escalation_claim,
    escalation_release,
    escalation_resolve,
    staff_name,
    staff_reply,
)
from .models import EndUser, Escalation, Message
from .selectors import thread_get_for_user

CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
RECENT_MESSAGES = 100
ESCALATION_ACTIONS = {
    "claim": escalation_claim,
    "release": escalation_release,
    "hand_back": escalation_resolve,
}


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
        }
        for escalation in rows
    ]


class FrameError(Exception):
    """A staff frame was refused; becomes an ``error`` frame. Nothing was changed."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


def _escalation_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FrameError("bad_frame", "'escalation_id' must be an escalation's id", field="escalation_id")
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 0 < number < 2**63:  # not an id the database could hold
        raise FrameError("not_found", f"escalation {value!r} not found for this user")
    return number


def staff_act(*, kind: str, staff_pk: int, end_user: EndUser, frame: dict[str, Any]) -> dict[str, Any]:
    """Run one staff frame (``reply``, ``claim``, ``release``, ``hand_back``) through the services.

    The staff account is read again, so a deactivated account or a withdrawn permission stops
    acting at once, not at the next connection.

    Returns:
        The ``ack`` frame's fields.

    Raises:
        FrameError: the frame was refused; nothing changed.
    """
    staff_user = get_user_model().objects.filter(pk=staff_pk).first()
    if not may_act(staff_user):
        raise FrameError("forbidden", "you may not act on conversations (staff with escalation rights only)")
    if kind == "reply":
        thread_id, content = frame.get("thread_id"), frame.get("content")
        if not isinstance(thread_id, str):
            raise FrameError("bad_frame", "'thread_id' must be a string", field="thread_id")
        if not isinstance(content, str):
            raise FrameError("bad_frame", "'content' must be a string", field="content")
        try:
            thread = thread_get_for_user(user=end_user, thread_id=thread_id)
        except NotFound as exc:
            raise FrameError("not_found", str(exc), field="thread_id") from None
        try:
            message = staff_reply(thread=thread, staff_user=staff_user, content=content)
        except InvalidInput as exc:
            raise FrameError("invalid_input", str(exc), field="content") from None
        except PermissionError as exc:
            raise FrameError("forbidden", str(exc), field="thread_id") from None
        return {"action": kind, "message_id": str(message.pk), "thread_id": str(thread.pk)}
    escalation_id = _escalation_id(frame.get("escalation_id"))
    escalation = Escalation.objects.filter(user=end_user, pk=escalation_id).first()
    if escalation is None:
        raise FrameError("not_found", f"escalation {escalation_id} not found for this user")
    try:
        ESCALATION_ACTIONS[kind](escalation=escalation, staff_user=staff_user)
    except InvalidInput as exc:  # the escalation is not in a state that allows it (claimed, resolved)
        raise FrameError("conflict", str(exc), escalation_id=escalation.pk) from None
    except PermissionError as exc:  # another staff member holds it
        raise FrameError("forbidden", str(exc), escalation_id=escalation.pk) from None
    return {"action": kind, "escalation_id": escalation.pk}


class StaffConsumer(JsonFrameConsumer):
    """``/ws/staff/users/<user_pk>/``: one end user's conversation, live, for staff (see the module)."""

    FRAMES = {
        "reply": "_on_reply",
        "claim": "_on_claim",
        "release": "_on_release",
        "hand_back": "_on_hand_back",
        "typing": "_on_typing",
        "resume": "_on_resume",
        "ping": "_on_ping",
    }
    end_user: EndUser
    staff_user: Any
    staff_pk: int
    _may_act: bool = False
    _joined: tuple[str, ...] = ()

    async def connect(self) -> None:
        staff_user = self.scope.get("user")
        if not await database_sync_to_async(may_watch)(staff_user):
            # Accept first: a close before accepting reaches browsers as a bare HTTP 403 with no code.
            await self._refuse("forbidden", "staff only: log in to the admin", CLOSE_FORBIDDEN)
            return
        end_user = await EndUser.objects.filter(pk=self.scope["url_route"]["kwargs"]["user_pk"]).afirst()
        if end_user is None:
            await self._refuse("not_found", "no such end user", CLOSE_NOT_FOUND)
            return
        self.end_user, self.staff_user, self.staff_pk = end_user, staff_user, staff_user.pk
        self._may_act = await database_sync_to_async(may_act)(staff_user)
        self._joined = (user_group(end_user.pk), staff_group(end_user.pk))
        for group in self._joined:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        await self._send(
            {
                "type": "ready",
                "protocol": 1,
                "user_id": end_user.external_id,
                "user_pk": end_user.pk,
                "may_act": self._may_act,
            }
        )
        await self._send_escalations()

    async def disconnect(self, code: int) -> None:
        for group in self._joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def _refuse(self, code: str, message: str, close_code: int) -> None:
        await self.accept()
        await self._error(code, message)
        await self.close(code=close_code)

    async def _send_escalations(self) -> None:
        rows = await database_sync_to_async(escalations_for_staff)(
            user_pk=self.end_user.pk, staff_user=self.staff_user
        )
        await self._send({"type": "escalations", "escalations": rows})

    async def _on_ping(self, frame: dict[str, Any]) -> None:
        await self._send({"type": "pong"})

    async def _on_typing(self, frame: dict[str, Any]) -> None:
        state = frame.get("state")
        if not isinstance(state, bool):
            await self._error("bad_frame", "'state' must be true or false", field="state")
            return
        if not self._may_act:
            await self._error(
                "forbidden", "you may not act on conversations (staff with escalation rights only)"
            )
            return
        await apublish(
            user_pk=self.end_user.pk, event={"kind": "typing", "role": "human_agent", "state": state}
        )

    def history_owner(self) -> EndUser:
        return self.end_user

    async def _on_action(self, kind: str, frame: dict[str, Any]) -> None:
        client = self.scope.get("client") or [None]
        try:
            with audit_scope(ip=client[0], route=f"WS {self.scope.get('path', '')} {kind}"):
                done = await database_sync_to_async(staff_act)(
                    kind=kind, staff_pk=self.staff_pk, end_user=self.end_user, frame=frame
                )
        except FrameError as exc:
            await self._error(exc.code, str(exc), action=kind, **exc.extra)
            return
        await self._send({"type": "ack", **done})
        if kind in ESCALATION_ACTIONS:  # every staff page watching this user redraws its escalations
            await self.channel_layer.group_send(staff_group(self.end_user.pk), {"type": "staff.changed"})

    # The four staff actions share one handler (checks, the service call, the acknowledgement).
    _on_reply = partialmethod(_on_action, "reply")
    _on_claim = partialmethod(_on_action, "claim")
    _on_release = partialmethod(_on_action, "release")
    _on_hand_back = partialmethod(_on_action, "hand_back")

    async def chat_event(self, event: dict[str, Any]) -> None:
        """An event of the end user's conversation: forwarded as a frame whose ``type`` is its kind."""
        body = dict(event["event"])
        kind = body.pop("kind", "event")
        if kind == "turn" and isinstance(body.get("turn"), dict):
            turn = body["turn"]
            await self._send({"type": "turn", **turn})
            if turn.get("escalated"):  # the turn may have opened an escalation
                await self._send_escalations()
            return
        await self._send({"type": kind, **body})
        if kind in ("human_joined", "bot_back"):  # claimed or handed back, here or in the admin queue
            await self._send_escalations()

    async def staff_changed(self, event: dict[str, Any]) -> None:
        await self._send_escalations()

    async def chat_erased(self, event: dict[str, Any]) -> None:
        """The end user was erased: nothing is left to watch; close as for an unknown user."""
        if not self._closing:
            self._closing = True
            await self._error("not_found", "this end user was erased")
            await self.close(code=CLOSE_NOT_FOUND)


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
        },
    }
    return TemplateResponse(request, "admin/conversations/enduser/live.html", context)
