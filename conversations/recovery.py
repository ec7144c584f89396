"""Every stored user message reaches a terminal state: re-queue the stuck ones, fail the hopeless.

A message is stuck when it is ``pending`` for longer than ``PENDING_GRACE`` (never queued, or its task
was lost with a worker) or ``processing`` under a claim older than ``STALE_CLAIM`` (its worker died).
Celery beat runs ``recover_unanswered`` every ``SWEEP_EVERY``; it re-queues each stuck message (at
most every ``REQUEUE_SPACING``) and the claim decides who runs it, so a message a live worker holds
is never run twice. Once a message has been re-queued ``MAX_REQUEUES`` times and is still stuck, it
is marked ``failed`` with the reason and the user's connections get an ``error`` event.

The re-queue count lives in the cache (Redis) for a day: losing it only restarts the count.
The windows are in ``agentflow.limits``.
"""

from __future__ import annotations

import logging
import math
from datetime import datetime, timedelta
from typing import Any

from celery import shared_task
from django.core.cache import cache
from django.db.models import Q
from django.utils import timezone

from agentflow import limits
from agentflow.jobs import TURN_TASK

from .events import publish
from .models import Message
from .turn_results import turn_settled_on_commit

logger = logging.getLogger("agentflow.recovery")

RECOVER_TASK = "conversations.recover_unanswered"
UNANSWERED_CODE = "unanswered"
UNANSWERED_NOTICE = "Your message could not be answered. Please send it again."
COUNT_TTL = 24 * 3600


def _count_key(message_id: Any) -> str:
    return f"recovery:{message_id}"


def stuck_filter(*, now: datetime, grace: timedelta, stale_after: timedelta) -> Q:
    """User messages that nothing is answering: pending past the grace period, or under a stale claim."""
    # role and status spelled out as in the partial index conversations_message_unanswered (0008).
    unanswered = Q(role=Message.Role.USER, status__in=[Message.Status.PENDING, Message.Status.PROCESSING])
    # A pending message given back by its task (processing_started_at: when) is stuck only once the
    # grace period has passed since then too: its task is retrying it (LLM backoff, an outage).
    given_back_long_ago = Q(processing_started_at__isnull=True) | Q(processing_started_at__lt=now - grace)
    return unanswered & (
        (Q(status=Message.Status.PENDING, created_at__lt=now - grace) & given_back_long_ago)
        | Q(status=Message.Status.PROCESSING, processing_started_at__lt=now - stale_after)
    )


def claim_retry_in(*, message_id: Any, now: datetime | None = None) -> float | None:
    """Seconds until another worker's live claim on the message goes stale (None: not held)."""
    started = (
        Message.objects.filter(pk=message_id, status=Message.Status.PROCESSING)
        .values_list("processing_started_at", flat=True)
        .first()
    )
    if started is None:
        return None
    left = (started + limits.STALE_CLAIM - (now or timezone.now())).total_seconds()
    return float(max(1, math.ceil(left) + 1))


def messages_recover(
    *,
    now: datetime | None = None,
    grace: timedelta = limits.PENDING_GRACE,
    stale_after: timedelta = limits.STALE_CLAIM,
    spacing: timedelta = limits.REQUEUE_SPACING,
    max_requeues: int = limits.MAX_REQUEUES,
    limit: int = 500,
) -> dict[str, int]:
    """Re-queue stuck user messages; fail those re-queued ``max_requeues`` times already.

    Returns:
        ``{"requeued": n, "failed": n, "waiting": n}`` (``waiting``: re-queued less than ``spacing`` ago).
    """
    now = now or timezone.now()
    stuck = list(
        Message.objects.filter(stuck_filter(now=now, grace=grace, stale_after=stale_after))
        .order_by("created_at")
        .values_list("pk", "user_id", "status")[:limit]
    )
    counts = {"requeued": 0, "failed": 0, "waiting": 0}
    for pk, user_pk, status in stuck:
        key = _count_key(pk)
        entry = cache.get(key) or {"count": 0, "at": 0.0}
        if entry["count"] and now.timestamp() - entry["at"] < spacing.total_seconds():
            counts["waiting"] += 1
            continue
        if entry["count"] >= max_requeues:
            if _fail(pk, now=now, grace=grace, stale_after=stale_after, requeues=entry["count"]):
                counts["failed"] += 1
                publish(
                    user_pk=user_pk,
                    event={
                        "kind": "error",
                        "code": UNANSWERED_CODE,
                        "message": UNANSWERED_NOTICE,
                        "message_id": str(pk),
                    },
                )
                cache.delete(key)
            continue
        cache.set(key, {"count": entry["count"] + 1, "at": now.timestamp()}, timeout=COUNT_TTL)
        from celery import current_app

        current_app.send_task(TURN_TASK, args=[str(pk)])
        logger.warning(
            "re-queued unanswered message %s (%s, re-queue %s of %s)",
            pk,
            status,
            entry["count"] + 1,
            max_requeues,
        )
        counts["requeued"] += 1
    return counts


def _fail(pk: Any, *, now: datetime, grace: timedelta, stale_after: timedelta, requeues: int) -> bool:
    """Mark a message failed if it is still stuck (a live worker's fresh claim wins the race)."""
    error = (
        f"not answered after {requeues} re-queues (pending over {int(grace.total_seconds())} s or a claim"
        f" older than {int(stale_after.total_seconds())} s each time): no worker could run this turn"
    )
    failed = Message.objects.filter(
        stuck_filter(now=now, grace=grace, stale_after=stale_after), pk=pk
    ).update(status=Message.Status.FAILED, error=error)
    if failed:
        logger.error("message %s failed: %s", pk, error)
        turn_settled_on_commit(message_id=pk, status=Message.Status.FAILED)
    return failed == 1


@shared_task(name=RECOVER_TASK)
def recover_unanswered() -> dict[str, int]:
    """Beat task (every ``agentflow.limits.SWEEP_EVERY``): see ``messages_recover``."""
    return messages_recover()
