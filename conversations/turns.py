"""Writes of a turn: placing a user message in its thread, storing the reply, recording messages.

The runtime (``agentflow.pipeline``) decides; these services write, each in the caller's
transaction or their own short one. They are idempotent where a turn may run twice (a retried or
redelivered task): the reply is unique per user message, and a finished message is never reopened.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any

import numpy as np
from django.db import IntegrityError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from agentflow import prepared
from agentflow.types import ThreadEvent

from . import handoff
from . import services as conv_services
from .models import Message, Thread, ThreadActivity
from .turn_results import turn_settled_on_commit

ACTIVITY_FOR_EVENT = {
    ThreadEvent.NEW_TOPIC: ThreadActivity.Kind.OPENED,
    ThreadEvent.FOLLOW_UP: ThreadActivity.Kind.FOLLOW_UP,
    ThreadEvent.RETURN: ThreadActivity.Kind.RETURNED,
    ThreadEvent.RESOLUTION: ThreadActivity.Kind.RESOLVED,
}


def message_place(
    *,
    message: Message,
    event: str,
    thread: Thread | None,
    confidence: float,
    signals: Mapping[str, Any],
    intent: str | None,
    intent_confidence: float,
    candidates: list[dict[str, Any]],
    embedding: np.ndarray,
    now: datetime,
    claim: bool = False,
) -> Thread:
    """Store a thread decision and the intent on a user message. Call under the user's lock.

    ``thread`` None opens a new thread; a resolution resolves ``thread``; anything else adds the
    message to it. The thread activity of the event is recorded. With ``claim``, the same write
    claims the message for this turn (``processing``; see ``message_claim_locked``).
    """
    reopened = False
    if thread is None:
        thread = conv_services.thread_new(
            user=message.user,
            session=message.session,
            text=message.content,
            embedding=embedding,
            now=now,
            intent=intent or "",
        )
        thread_write: prepared.Write = prepared.Insert(thread)
    elif event == ThreadEvent.RESOLUTION:
        fields = conv_services.thread_take_resolution(thread=thread, by=message, embedding=embedding, now=now)
        thread_write = prepared.Update(thread, fields)
    else:
        reopened = thread.status == Thread.Status.RESOLVED
        fields = conv_services.thread_take_message(
            thread=thread, text=message.content, embedding=embedding, now=now
        )
        thread_write = prepared.Update(thread, fields)
    message.thread = thread
    message.thread_event = event
    message.thread_confidence = round(confidence, 4)
    message.thread_signals = dict(signals)
    message.intent = intent or ""
    message.confidence = intent_confidence
    message.intent_candidates = candidates
    fields = [
        "thread",
        "thread_event",
        "thread_confidence",
        "thread_signals",
        "intent",
        "confidence",
        "intent_candidates",
    ]
    if claim:
        message.status, message.processing_started_at, message.error = Message.Status.PROCESSING, now, ""
        fields += ["status", "processing_started_at", "error"]
    activities = [
        conv_services.thread_activity_new(
            thread=thread, kind=ACTIVITY_FOR_EVENT[event], message=message, actor=ThreadActivity.Actor.USER
        )
    ]
    if reopened:  # the user came back to a resolved thread: its timeline says it was reopened (after)
        activities.append(
            conv_services.thread_activity_new(
                thread=thread,
                kind=ThreadActivity.Kind.REOPENED,
                message=message,
                actor=ThreadActivity.Actor.USER,
            )
        )
    # The thread's write, the message's and its activities: one statement (a new thread's row is
    # referenced by the others: Django's foreign keys are checked at commit).
    prepared.write_together(thread_write, prepared.Update(message, fields), prepared.Insert(*activities))
    return thread


def message_reclassify(
    *, message: Message, intent: str, confidence: float, candidates: list[dict[str, Any]], source: str
) -> None:
    """Store another intent decision (the LLM's) on a placed user message."""
    message.intent, message.confidence = intent, confidence
    message.intent_candidates = candidates
    message.thread_signals = {**message.thread_signals, "intent_source": source}
    message.save(update_fields=["intent", "confidence", "intent_candidates", "thread_signals"])


def message_mark_placed(*, message: Message) -> None:
    """Finish a message that was only placed in a thread (evaluation, imports): no reply."""
    message.status = Message.Status.DONE
    message.save(update_fields=["status"])


def turn_finish_held(*, message: Message, handled_by: str, reason: str) -> None:
    """Mark a turn in a human-held thread done, with no reply. Running it twice changes nothing more.

    The thread stays in the queue: if staff handed it back meanwhile, the message (which got no bot
    reply) opens a new escalation rather than go unanswered.
    """
    with transaction.atomic():
        marked = (
            Message.objects.filter(pk=message.pk)
            .exclude(status=Message.Status.DONE)
            .update(status=Message.Status.DONE, escalated=True, handled_by=handled_by, error="")
        )
        message.refresh_from_db()
        if marked:
            assert message.thread is not None
            handoff.escalation_open(thread=message.thread, message=message, reason=reason)
            turn_settled_on_commit(message_id=message.pk, status=Message.Status.DONE)


def turn_finish(
    *,
    message: Message,
    reply_fields: Mapping[str, Any],
    escalation_reason: str,
    also: Sequence[prepared.Write] = (),
) -> Message | None:
    """Store the reply to ``message`` and mark the turn done. Running it twice stores one reply.

    An escalated reply opens the thread's escalation (the hand-off queue; idempotent). ``also``: writes
    of other rows that belong to the reply (the memories it used), in the same statement: stored with
    it, or not at all when another run of the turn stored its reply first.

    Returns:
        The reply, or None when another run of this turn stored its reply first (that one stands).
    """
    escalated = bool(reply_fields.get("escalated"))
    # Not escalated, the reply, the message done and the thread's fields are one statement: in
    # autocommit it is its own transaction (``prepared.write_together``), with no BEGIN and COMMIT
    # round trips; the "turn settled" signal then goes out right after it.
    single = not escalated and not transaction.get_connection().in_atomic_block
    try:
        with contextlib.nullcontext() if single else transaction.atomic():
            thread = message.thread
            assert thread is not None
            reply = Message(
                user=message.user,
                session_id=message.session_id,
                thread_id=message.thread_id,
                reply_to=message,
                role=Message.Role.ASSISTANT,
                intent=message.intent,
                **reply_fields,
            )
            # The reply, the message done and the thread's reply fields: one statement. A second
            # run of the turn fails it on the reply's uniqueness, storing none of the three.
            conv_services.turn_mark_done_with_reply(
                message=message,
                reply=reply,
                thread=thread,
                escalated=escalated,
                now=timezone.now(),
                also=also,
            )
            if escalated:
                handoff.escalation_open(thread=thread, message=message, reason=escalation_reason)
            turn_settled_on_commit(message_id=message.pk, status=Message.Status.DONE)
    except IntegrityError:
        message.refresh_from_db()
        return None
    return reply


def message_record(*, thread: Thread, role: str, content: str) -> Message:
    """Append a finished assistant or human-agent message to ``thread`` (imports, evaluation)."""
    with transaction.atomic():
        stored = Message.objects.create(
            user=thread.user,
            session_id=thread.session_id,
            thread=thread,
            role=role,
            content=content,
            status=Message.Status.DONE,
        )
        conv_services.thread_add_reply(thread=thread, text=content, now=timezone.now())
    return stored


def message_for_turn(
    *, message_id: Any, lock: bool = False, annotations: Mapping[str, Any] | None = None
) -> Message:
    """A user message with what its turn reads (user, its agent, session), or ``Message.DoesNotExist``.

    ``lock``: row-lock the message and its user until the transaction ends (the turn's claim and the
    user's lock, ``services.user_lock``, in the same statement). ``annotations``: more to read with
    it (the intent categories' fingerprint).
    """
    return message_for_turn_rows(message_id=message_id, lock=lock, annotations=annotations).get()


def message_for_turn_rows(
    *, message_id: Any, lock: bool = False, annotations: Mapping[str, Any] | None = None
) -> QuerySet[Message]:
    """The query of ``message_for_turn`` (at most one row), for a caller that compiles it once
    (``agentflow.prepared``)."""
    rows = Message.objects.select_related("user", "user__agent", "session")
    if lock:
        rows = rows.select_for_update(no_key=True, of=("self", "user"))
    if annotations:
        rows = rows.annotate(**annotations)
    return rows.filter(pk=message_id, role=Message.Role.USER)


def message_claimable(*, message: Message, now: datetime, stale_after: timedelta) -> bool:
    """Whether a turn may claim ``message`` (read under its row lock): pending or failed, or held by
    a worker for longer than ``stale_after`` (that worker died). The rule of ``message_claim``."""
    if message.status in (Message.Status.PENDING, Message.Status.FAILED):
        return True
    return (
        message.status == Message.Status.PROCESSING
        and message.processing_started_at is not None
        and message.processing_started_at < now - stale_after
    )


def message_claim_locked(*, message: Message, now: datetime) -> None:
    """Claim a message read under its row lock, one that is already placed (a retried turn)."""
    message.status, message.processing_started_at, message.error = Message.Status.PROCESSING, now, ""
    message.save(update_fields=["status", "processing_started_at", "error"])
