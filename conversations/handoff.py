"""Hand-off to humans: the escalation queue and staff replies.

An escalating turn opens an ``Escalation`` on its thread (``escalation_open``, called by the turn
pipeline). Staff claim it, reply as a human agent and hand the thread back to the bot. While an
escalation is unresolved the bot stays silent in the thread (``selectors.thread_held_by_human``).

The user's connections are told live (``events.publish``, after the transaction commits):
``human_joined`` when a staff member claims the thread, ``human_message`` for each staff reply and
``bot_back`` when the thread is handed back. Each carries the stored message's fields.
"""

from __future__ import annotations

from typing import Any

from django.db import IntegrityError, transaction
from django.utils import timezone

from agentflow.errors import InvalidInput
from agentflow.validation import clean_message

from .audit import audit_record
from .events import message_payload, publish_on_commit, staff_queue_publish_on_commit
from .models import AuditEvent, Escalation, Message, StaffUser, Thread
from .services import thread_add_reply

STAFF_REPLY_MAX_CHARS = 4000
JOINED_TEXT = "A member of our team ({name}) has joined the conversation."
BOT_BACK_TEXT = "The assistant is back in this conversation."


def staff_name(staff_user: StaffUser) -> str:
    """What the user is shown of a staff member: their first name, else their username."""
    return getattr(staff_user, "first_name", "") or staff_user.get_username()


def message_event(*, kind: str, message: Message) -> dict[str, Any]:
    """A live event carrying a stored message."""
    return {"kind": kind, **message_payload(message)}


def _publish_on_commit(*, kind: str, message: Message) -> None:
    publish_on_commit(user_pk=message.user_id, event=message_event(kind=kind, message=message))


def _thread_message(*, thread: Thread, role: str, content: str) -> Message:
    """Store a finished message in the thread, in the session the thread was last active in."""
    latest = (
        Message.objects.filter(thread=thread).order_by("-created_at").values_list("session_id", flat=True)
    )
    return Message.objects.create(
        user_id=thread.user_id,
        session_id=latest.first() or thread.session_id,
        thread=thread,
        role=role,
        content=content,
        status=Message.Status.DONE,
        handled_by="human" if role == Message.Role.HUMAN_AGENT else "",
    )


def _locked(escalation: Escalation) -> Escalation:
    return (
        Escalation.objects.select_for_update(of=("self",))
        .select_related("thread", "holder")
        .get(pk=escalation.pk)
    )


def _may_act(escalation: Escalation, staff_user: StaffUser) -> bool:
    """The holder of a claimed escalation, or a superuser, may release it or hand it back."""
    return escalation.holder_id == staff_user.pk or bool(getattr(staff_user, "is_superuser", False))


def _audit(action: str, escalation: Escalation, staff_user: StaffUser) -> None:
    """Record a staff action on an escalation, and tell every open inbox that it changed."""
    staff_queue_publish_on_commit(
        event={"kind": "escalation_changed", "escalation_id": escalation.pk, "status": escalation.status}
    )
    audit_record(
        action=action,
        staff_user=staff_user,
        target=escalation,
        end_user_pk=escalation.user_id,
        detail={"thread_id": str(escalation.thread_id)},
    )


def escalation_open(*, thread: Thread, message: Message | None, reason: str) -> Escalation:
    """Put the thread in the hand-off queue. Idempotent: an unresolved escalation is returned as it is.

    Args:
        thread: the thread a human should take over.
        message: the user message whose turn asked for a human.
        reason: why (shown in the queue).

    Returns:
        The thread's unresolved escalation (new or existing).
    """
    with transaction.atomic():
        Thread.objects.select_for_update().filter(pk=thread.pk).first()  # serialise openings per thread
        existing = Escalation.objects.filter(thread=thread).exclude(status=Escalation.Status.RESOLVED).first()
        if existing is not None:
            return existing
        try:
            with transaction.atomic():
                created = Escalation.objects.create(
                    thread=thread, user_id=thread.user_id, message=message, reason=reason[:2000]
                )
            staff_queue_publish_on_commit(event={"kind": "escalation_opened", "escalation_id": created.pk})
            return created
        except IntegrityError:  # opened concurrently: that one stands
            return Escalation.objects.filter(thread=thread).exclude(status=Escalation.Status.RESOLVED).get()


def escalation_claim(*, escalation: Escalation, staff_user: StaffUser) -> Escalation:
    """A staff member takes the thread over (open -> claimed); the user is told who joined.

    Raises:
        InvalidInput: the escalation is not open (already claimed or resolved); nothing changed.
    """
    with transaction.atomic():
        escalation = _locked(escalation)
        if escalation.status == Escalation.Status.CLAIMED:
            holder = staff_name(escalation.holder) if escalation.holder else "someone"
            raise InvalidInput(f"this escalation is already claimed by {holder}", field="escalation")
        if escalation.status == Escalation.Status.RESOLVED:
            raise InvalidInput("this escalation is resolved: the bot has the thread back", field="escalation")
        escalation.status = Escalation.Status.CLAIMED
        escalation.holder = staff_user
        escalation.claimed_at = timezone.now()
        escalation.save(update_fields=["status", "holder", "claimed_at"])
        notice = _thread_message(
            thread=escalation.thread,
            role=Message.Role.SYSTEM,
            content=JOINED_TEXT.format(name=staff_name(staff_user)),
        )
        _publish_on_commit(kind="human_joined", message=notice)
        _audit(AuditEvent.Action.ESCALATION_CLAIM, escalation, staff_user)
    return escalation


def escalation_release(*, escalation: Escalation, staff_user: StaffUser) -> Escalation:
    """Put a claimed escalation back in the queue (claimed -> open). The bot stays silent meanwhile.

    Raises:
        InvalidInput: the escalation is not claimed; nothing changed.
        PermissionError: another staff member holds it (only they or a superuser may release it).
    """
    with transaction.atomic():
        escalation = _locked(escalation)
        if escalation.status != Escalation.Status.CLAIMED:
            raise InvalidInput(
                f"only a claimed escalation can be released; this one is {escalation.status}",
                field="escalation",
            )
        if not _may_act(escalation, staff_user):
            holder = staff_name(escalation.holder) if escalation.holder else "someone else"
            raise PermissionError(f"this escalation is held by {holder}; only they can release it")
        escalation.status = Escalation.Status.OPEN
        escalation.holder = None
        escalation.claimed_at = None
        escalation.save(update_fields=["status", "holder", "claimed_at"])
        _audit(AuditEvent.Action.ESCALATION_RELEASE, escalation, staff_user)
    return escalation


def escalation_resolve(*, escalation: Escalation, staff_user: StaffUser) -> Escalation:
    """Hand the thread back to the bot (-> resolved), leaving a marker message in the thread.

    Raises:
        InvalidInput: the escalation is already resolved; nothing changed.
        PermissionError: another staff member holds it (only they or a superuser may hand it back).
    """
    with transaction.atomic():
        escalation = _locked(escalation)
        if escalation.status == Escalation.Status.RESOLVED:
            raise InvalidInput("this escalation is already handed back to the bot", field="escalation")
        if escalation.status == Escalation.Status.CLAIMED and not _may_act(escalation, staff_user):
            holder = staff_name(escalation.holder) if escalation.holder else "someone else"
            raise PermissionError(f"this escalation is held by {holder}; only they can hand it back")
        if escalation.holder_id is None:
            escalation.holder = staff_user
        escalation.status = Escalation.Status.RESOLVED
        escalation.resolved_at = timezone.now()
        escalation.save(update_fields=["status", "holder", "resolved_at"])
        marker = _thread_message(thread=escalation.thread, role=Message.Role.SYSTEM, content=BOT_BACK_TEXT)
        _publish_on_commit(kind="bot_back", message=marker)
        _audit(AuditEvent.Action.ESCALATION_HAND_BACK, escalation, staff_user)
    return escalation


def staff_reply(*, thread: Thread, staff_user: StaffUser, content: str) -> Message:
    """Store a staff member's reply in the thread (role ``human_agent``) and send it to the user live.

    Only the holder of the thread's claimed escalation may reply.

    Raises:
        InvalidInput: the content is empty or too long; nothing was stored.
        PermissionError: the thread has no escalation claimed by this staff member; nothing was stored.
    """
    text = clean_message(content, max_chars=STAFF_REPLY_MAX_CHARS)
    with transaction.atomic():
        escalation = (
            Escalation.objects.select_for_update(of=("self",))
            .select_related("holder")
            .filter(thread=thread)
            .exclude(status=Escalation.Status.RESOLVED)
            .first()
        )
        if escalation is None:
            raise PermissionError("no human holds this thread: open and claim an escalation before replying")
        if escalation.status != Escalation.Status.CLAIMED:
            raise PermissionError("claim this escalation before replying")
        if escalation.holder_id != staff_user.pk:
            holder = staff_name(escalation.holder) if escalation.holder else "someone else"
            raise PermissionError(f"this thread is held by {holder}; only they can reply")
        reply = _thread_message(thread=thread, role=Message.Role.HUMAN_AGENT, content=text)
        thread_add_reply(
            thread=Thread.objects.select_for_update().get(pk=thread.pk), text=text, now=timezone.now()
        )
        _publish_on_commit(kind="human_message", message=reply)
        audit_record(
            action=AuditEvent.Action.STAFF_REPLY,
            staff_user=staff_user,
            target=reply,
            end_user_pk=thread.user_id,
            detail={"thread_id": str(thread.pk), "escalation_id": escalation.pk, "chars": len(text)},
        )
    return reply
