"""Per-user export and erase: everything AgentFlow stores about one end user, out as JSON or gone.

The user's rows are their sessions, threads, messages, thread activities, escalations and their own
memories. Global memories belong to no one and stay, but their provenance may name the user's threads
or messages: erasing the user removes those references too.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from django.db import transaction
from django.db.models import Q, TextField
from django.db.models.functions import Cast
from django.utils import timezone

from agentflow.errors import NotFound
from conversations.audit import audit_export_rows, audit_forget_subject, audit_record, subject_hash
from conversations.chat_tokens import chat_token_revoke
from conversations.events import user_erased_on_commit
from conversations.models import (
    ApiKey,
    AuditEvent,
    ChatSession,
    EndUser,
    Escalation,
    Message,
    StaffUser,
    Thread,
    ThreadActivity,
)

from .models import Memory

if TYPE_CHECKING:
    pass

EXPORT_FORMAT = "agentflow.user-export/1"

# The kinds ``user_erase`` reports, keyed by the model Django's deletion collector names.
_ERASED_KINDS = {
    EndUser._meta.label: "users",
    ChatSession._meta.label: "sessions",
    Thread._meta.label: "threads",
    Message._meta.label: "messages",
    ThreadActivity._meta.label: "activities",
    Escalation._meta.label: "escalations",
    Memory._meta.label: "memories",
}
_SCRUB_BATCH = 200  # ids per provenance query: keeps each SQL statement small for long histories


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def _str(value: object | None) -> str | None:
    return str(value) if value is not None else None


def user_export(
    *, user: EndUser, staff_user: StaffUser | None = None, api_key: ApiKey | None = None
) -> dict[str, Any]:
    """Everything stored about ``user``, as plain JSON-serialisable data (ids and datetimes as strings).

    Embeddings and derived thread features are left out: they are not readable data about the user.
    Staff appear only as the escalation holder's username. Global memories are not the user's and are
    not included. The export itself is audited (by ``staff_user``, ``api_key`` or the system), and
    the audit rows about the user are part of it (``audit``).

    Args:
        user: the end user to export.
        staff_user: the staff account asking (the admin).
        api_key: the API key asking (REST).

    Returns:
        ``{"format", "exported_at", "user", "sessions", "threads", "messages", "activities",
        "escalations", "memories", "audit"}``, each list oldest first.
    """
    audit_record(
        action=AuditEvent.Action.USER_EXPORT,
        staff_user=staff_user,
        api_key=api_key,
        target=user,
        subject=user.external_id,
    )
    sessions = ChatSession.objects.filter(user=user).order_by("started_at", "id")
    threads = Thread.objects.filter(user=user).order_by("opened_at", "id")
    messages = Message.objects.filter(user=user).order_by("created_at", "id")
    activities = ThreadActivity.objects.filter(user=user).order_by("created_at", "id")
    escalations = Escalation.objects.filter(user=user).select_related("holder").order_by("created_at", "id")
    memories = Memory.objects.filter(user=user).order_by("created_at", "id")
    return {
        "format": EXPORT_FORMAT,
        "exported_at": timezone.now().isoformat(),
        "user": {
            "external_id": user.external_id,
            "display_name": user.display_name,
            "metadata": user.metadata,
            "created_at": _iso(user.created_at),
            "last_seen_at": _iso(user.last_seen_at),
        },
        "sessions": [
            {
                "id": str(s.id),
                "status": s.status,
                "started_at": _iso(s.started_at),
                "last_activity_at": _iso(s.last_activity_at),
                "expires_at": _iso(s.expires_at),
                "ended_at": _iso(s.ended_at),
            }
            for s in sessions
        ],
        "threads": [
            {
                "id": str(t.id),
                "session_id": str(t.session_id),
                "status": t.status,
                "topic": t.topic,
                "intent": t.intent,
                "escalated": t.escalated,
                "opened_at": _iso(t.opened_at),
                "last_activity_at": _iso(t.last_activity_at),
                "resolved_at": _iso(t.resolved_at),
                "resolution": t.resolution,
            }
            for t in threads
        ],
        "messages": [
            {
                "id": str(m.id),
                "session_id": str(m.session_id),
                "thread_id": _str(m.thread_id),
                "role": m.role,
                "content": m.content,
                "created_at": _iso(m.created_at),
                "thread_event": m.thread_event,
                "intent": m.intent,
                "confidence": m.confidence,
                "escalated": m.escalated,
            }
            for m in messages
        ],
        "activities": [
            {
                "thread_id": str(a.thread_id),
                "message_id": _str(a.message_id),
                "kind": a.kind,
                "actor": a.actor,
                "detail": a.detail,
                "created_at": _iso(a.created_at),
            }
            for a in activities
        ],
        "escalations": [
            {
                "thread_id": str(e.thread_id),
                "message_id": _str(e.message_id),
                "status": e.status,
                "reason": e.reason,
                "holder": e.holder.get_username() if e.holder is not None else None,
                "created_at": _iso(e.created_at),
                "claimed_at": _iso(e.claimed_at),
                "resolved_at": _iso(e.resolved_at),
            }
            for e in escalations
        ],
        "memories": [
            {
                "id": str(mem.id),
                "kind": mem.kind,
                "content": mem.content,
                "source": mem.source,
                "created_at": _iso(mem.created_at),
                "updated_at": _iso(mem.updated_at),
                "last_used_at": _iso(mem.last_used_at),
            }
            for mem in memories
        ],
        "audit": audit_export_rows(external_id=user.external_id),
    }


def _without_refs(value: Any, refs: frozenset[str]) -> Any:
    """``value`` with every string in ``refs`` removed: dict entries whose value is one, list items."""
    if isinstance(value, dict):
        return {k: _without_refs(v, refs) for k, v in value.items() if not (isinstance(v, str) and v in refs)}
    if isinstance(value, list):
        return [_without_refs(v, refs) for v in value if not (isinstance(v, str) and v in refs)]
    return value


def _batches(items: list[str], size: int) -> Iterable[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def _global_provenance_scrub(*, refs: list[str]) -> int:
    """Remove ``refs`` (the user's thread, message and session ids) from global memories' provenance.

    Returns:
        How many global memories changed.
    """
    if not refs:
        return 0
    candidates: set[Any] = set()
    globals_as_text = Memory.objects.filter(user__isnull=True).annotate(
        source_text=Cast("source", TextField())
    )
    for batch in _batches(refs, _SCRUB_BATCH):
        match = Q()
        for ref in batch:
            match |= Q(source_text__contains=ref)
        candidates.update(globals_as_text.filter(match).values_list("pk", flat=True))
    ref_set = frozenset(refs)
    changed = 0
    for memory in Memory.objects.select_for_update().filter(pk__in=candidates).order_by("pk"):
        cleaned = _without_refs(memory.source, ref_set)
        if cleaned != memory.source:
            memory.source = cleaned
            memory.save(update_fields=["source", "updated_at"])
            changed += 1
    return changed


def user_erase(
    *, user: EndUser, staff_user: StaffUser | None = None, api_key: ApiKey | None = None
) -> dict[str, int]:
    """Delete everything stored about ``user``, in one transaction, and say how much went.

    The end user row goes and cascades to their sessions, threads, messages, thread activities,
    escalations and memories. Global memories stay, but the user's thread, message and session ids
    are removed from their provenance. The audit rows about the user stay without their personal
    data (``audit_forget_subject``); the erase is audited with a keyed hash of their id only.

    Their chat tokens are revoked first (a message racing the erase then cannot bring the user
    back), and once the erase commits their open chat sockets are closed (code 4410).

    Args:
        user: the end user to erase.
        staff_user: the staff account erasing (the admin).
        api_key: the API key erasing (REST).

    Returns:
        Rows deleted per kind (``users``, ``sessions``, ``threads``, ``messages``, ``activities``,
        ``escalations``, ``memories``) and ``global_memories_scrubbed``.

    Raises:
        NotFound: the user was already erased; nothing changed.
    """
    if not EndUser.objects.filter(pk=user.pk).exists():
        raise NotFound(f"user {user.external_id!r} not found")
    chat_token_revoke(external_id=user.external_id)
    with transaction.atomic():
        locked = EndUser.objects.select_for_update().filter(pk=user.pk).first()
        if locked is None:
            raise NotFound(f"user {user.external_id!r} not found")
        refs = [
            *(str(pk) for pk in Thread.objects.filter(user=locked).values_list("pk", flat=True)),
            *(str(pk) for pk in Message.objects.filter(user=locked).values_list("pk", flat=True)),
            *(str(pk) for pk in ChatSession.objects.filter(user=locked).values_list("pk", flat=True)),
        ]
        scrubbed = _global_provenance_scrub(refs=refs)
        # The collector's own per-model counts: exactly what the cascade deleted, no count-then-delete race.
        _, per_model = EndUser.objects.filter(pk=locked.pk).delete()
        counts = {kind: per_model.get(label, 0) for label, kind in _ERASED_KINDS.items()}
        counts["global_memories_scrubbed"] = scrubbed
        audit_forget_subject(external_id=locked.external_id)
        audit_record(
            action=AuditEvent.Action.USER_ERASE,
            staff_user=staff_user,
            api_key=api_key,
            target_type="enduser",
            subject_hash=subject_hash(locked.external_id),
            detail=counts,
        )
        user_erased_on_commit(user_pk=locked.pk)
    return counts


def person_export(
    *,
    external_id: str,
    agent_id: int | None = None,
    staff_user: StaffUser | None = None,
    api_key: ApiKey | None = None,
) -> dict[str, Any]:
    """``user_export`` of a person across every agent they talked to (one end user row per agent), or
    with agent ``agent_id`` only.

    The lists are concatenated; each session, thread and message says which agent it belongs to, and
    ``agents`` names them all.

    Raises:
        NotFound: no agent has a user with this id.
    """
    from conversations.selectors import users_with_external_id

    users = [u for u in users_with_external_id(external_id=external_id) if agent_id in (None, u.agent_id)]
    if not users:
        raise NotFound(f"user {external_id!r} not found")
    merged: dict[str, Any] = {}
    for user in users:
        part = user_export(user=user, staff_user=staff_user, api_key=api_key)
        for key in ("sessions", "threads", "messages"):
            for row in part[key]:
                row["agent"] = user.agent.name
        if not merged:
            merged = part
            continue
        for key, value in part.items():
            if isinstance(value, list):
                merged[key].extend(value)
    merged["agents"] = [user.agent.name for user in users]
    return merged


def person_erase(
    *,
    external_id: str,
    agent_id: int | None = None,
    staff_user: StaffUser | None = None,
    api_key: ApiKey | None = None,
) -> dict[str, int]:
    """``user_erase`` of a person's end user rows with every agent (or agent ``agent_id`` only), in one
    transaction; the counts are added up.

    Raises:
        NotFound: no agent has a user with this id; nothing changed.
    """
    from conversations.selectors import users_with_external_id

    users = [u for u in users_with_external_id(external_id=external_id) if agent_id in (None, u.agent_id)]
    if not users:
        raise NotFound(f"user {external_id!r} not found")
    totals: dict[str, int] = {}
    with transaction.atomic():  # all of the person's rows, or none
        for user in users:
            for kind, count in user_erase(user=user, staff_user=staff_user, api_key=api_key).items():
                totals[kind] = totals.get(kind, 0) + count
    return totals
