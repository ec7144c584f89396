"""Reads of users' conversations. Every fetch of a user's data goes through a ``*_for_user`` function:
that is where per-user isolation is enforced."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta
from typing import Any, Protocol

from django.db.models import Exists, ExpressionWrapper, F, OuterRef, Q, QuerySet, Subquery

from agentflow.errors import NotFound
from agentflow.prepared import PreparedQuery
from agentflow.vectors import ArrayVectorField

from .models import ChatSession, EndUser, Escalation, Message, Thread


def _uuid(value: object, what: str) -> uuid.UUID:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(str(value))
    except ValueError:
        raise NotFound(f"{what} {value!r} not found") from None


def user_get(*, agent_id: int, external_id: str) -> EndUser:
    """The agent's end user with this host id: the one way transports reach a user's data."""
    try:
        return EndUser.objects.select_related("agent").get(agent_id=agent_id, external_id=external_id)
    except EndUser.DoesNotExist:
        raise NotFound(f"user {external_id!r} not found") from None


def users_with_external_id(*, external_id: str) -> QuerySet[EndUser]:
    """Every agent's end user with this host id (export and erase cover a person across agents)."""
    return EndUser.objects.filter(external_id=external_id).select_related("agent").order_by("agent__name")


def sessions_for_user(*, user: EndUser) -> QuerySet[ChatSession]:
    return ChatSession.objects.filter(user=user).order_by("-last_activity_at")


def session_get_for_user(*, user: EndUser, session_id: object) -> ChatSession:
    try:
        return ChatSession.objects.get(user=user, pk=_uuid(session_id, "session"))
    except ChatSession.DoesNotExist:
        raise NotFound(f"session {session_id} not found for this user") from None


def threads_for_user(
    *, user: EndUser, session_id: object | None = None, status: str | None = None
) -> QuerySet[Thread]:
    threads = Thread.objects.filter(user=user)
    if session_id is not None:
        threads = threads.filter(session=session_get_for_user(user=user, session_id=session_id))
    if status is not None:
        threads = threads.filter(status=status)
    return threads.order_by("-last_activity_at")


def thread_get_for_user(*, user: EndUser, thread_id: object) -> Thread:
    try:
        return Thread.objects.get(user=user, pk=_uuid(thread_id, "thread"))
    except Thread.DoesNotExist:
        raise NotFound(f"thread {thread_id} not found for this user") from None


RESOLVED_CANDIDATES = 3  # a message may go back to one of the latest resolved threads (and reopen it)
# The candidates' vectors, read as float32 arrays: the thread decision computes with them (numpy),
# and the list pgvector's field makes of each (three a thread, up to 13 threads a turn) was then
# turned back into an array: ~14 us a vector of 384 dimensions, both ways.
_CANDIDATE_VECTORS = ("topic_embedding", "opening_embedding", "last_user_embedding")


def _thread_candidates(*, user_id: int, limit: int) -> QuerySet[Thread]:
    resolved = (
        Thread.objects.filter(user_id=user_id, status=Thread.Status.RESOLVED)
        .order_by("-last_activity_at")
        .values("pk")[:RESOLVED_CANDIDATES]
    )
    unresolved = Escalation.objects.filter(thread=OuterRef("pk")).exclude(status=Escalation.Status.RESOLVED)
    return (
        Thread.objects.filter(user_id=user_id)
        .filter(~Q(status=Thread.Status.RESOLVED) | Q(pk__in=Subquery(resolved)))
        .defer(*_CANDIDATE_VECTORS)
        .annotate(
            held_by_human=Exists(unresolved),
            **{
                f"_{name}_array": ExpressionWrapper(F(name), output_field=ArrayVectorField())
                for name in _CANDIDATE_VECTORS
            },
        )
        .order_by("-last_activity_at")[: limit + RESOLVED_CANDIDATES]
    )


# Read on every turn: compiled once per connection (agentflow.prepared).
_THREAD_CANDIDATES = PreparedQuery(_thread_candidates)


def thread_candidates(*, user: EndUser, limit: int = 10) -> list[Thread]:
    """Where a new message may belong, most recently active first: up to ``limit`` of the user's
    unresolved threads and their ``RESOLVED_CANDIDATES`` most recently resolved ones (the latest
    thread even when it was just resolved: "thanks! one more thing..."; an earlier resolved one for
    "back to the printer: the E42 error is back", which reopens it).

    One query. Each thread carries ``held_by_human`` (an open or claimed escalation: the bot stays
    silent in it), so the turn need not ask again for the thread it picks. Their vectors
    (``topic_embedding``, ``opening_embedding``, ``last_user_embedding``) are float32 numpy arrays
    (or None), as on a thread the turn just wrote, not the lists a plain read gives.
    """
    threads: list[Thread] = _THREAD_CANDIDATES.run(shape={"limit": limit}, user_id=user.pk)
    kept, open_kept = [], 0
    for thread in threads:
        for name in _CANDIDATE_VECTORS:  # the deferred column, loaded: saves and reads see it
            setattr(thread, name, thread.__dict__.pop(f"_{name}_array"))
        if thread.status != Thread.Status.RESOLVED:
            if open_kept == limit:
                continue
            open_kept += 1
        kept.append(thread)
    return kept


def _live_undecided(*, pending_since: datetime | None, claimed_since: datetime | None) -> Q:
    """The undecided messages that still hold up later ones. With ``pending_since`` and
    ``claimed_since``, a ``pending`` message stored (or given back) before ``pending_since`` (its task
    was lost: the recovery sweep re-queues it) and a ``processing`` one claimed before
    ``claimed_since`` (its worker died) do not count: a stuck message never holds up the next ones."""
    if pending_since is None or claimed_since is None:
        return Q()
    return (
        Q(status=Message.Status.PENDING, created_at__gte=pending_since)
        | Q(status=Message.Status.PENDING, processing_started_at__gte=pending_since)  # given back, retried
        | Q(status=Message.Status.PROCESSING, processing_started_at__gte=claimed_since)
    )


def earlier_undecided_exists(
    *,
    user: EndUser,
    before: datetime,
    since: datetime,
    pending_since: datetime | None = None,
    claimed_since: datetime | None = None,
) -> bool:
    """Whether a message the user sent earlier (after ``since``) still waits for its thread decision
    (stuck ones excluded, see ``_live_undecided``)."""
    return (
        Message.objects.filter(
            user=user,
            role=Message.Role.USER,
            thread__isnull=True,
            status__in=[Message.Status.PENDING, Message.Status.PROCESSING],
            created_at__lt=before,
            created_at__gte=since,
        )
        .filter(_live_undecided(pending_since=pending_since, claimed_since=claimed_since))
        .exists()
    )


def earlier_undecided_annotation(
    *, window: timedelta, pending_since: datetime | None = None, claimed_since: datetime | None = None
) -> Exists:
    """``earlier_undecided_exists`` as an expression on a message row (the user's messages sent in
    ``window`` before it), read with the message. Under a lock the statement waited for, it can
    see an earlier message as still undecided when it was just placed: the turn then waits and
    reads again, which is safe; it never misses one that was undecided when the statement began."""
    return Exists(
        Message.objects.filter(
            user_id=OuterRef("user_id"),
            role=Message.Role.USER,
            thread__isnull=True,
            status__in=[Message.Status.PENDING, Message.Status.PROCESSING],
            created_at__lt=OuterRef("created_at"),
            created_at__gte=OuterRef("created_at") - window,
        ).filter(_live_undecided(pending_since=pending_since, claimed_since=claimed_since))
    )


class HistoryMessage(Protocol):
    """A message of a thread's history as the LLM sees it."""

    role: str
    content: str


def thread_history(*, thread: Thread, limit: int, before: Message | None = None) -> list[HistoryMessage]:
    """The thread's last ``limit`` finished messages, oldest first: their role and content only (a
    row, not a model instance: the turn reads ten of them, and the other columns cost it CPU)."""
    if before is None:
        rows = _THREAD_HISTORY.run(shape={"limit": limit, "bounded": False}, thread_id=thread.pk)
    else:
        rows = _THREAD_HISTORY.run(
            shape={"limit": limit, "bounded": True}, thread_id=thread.pk, before=before.created_at
        )
    return list(reversed(rows))


def _thread_history(
    *, thread_id: Any, limit: int, bounded: bool, before: datetime | None = None
) -> QuerySet[Message, Any]:
    messages = Message.objects.filter(thread_id=thread_id).exclude(status=Message.Status.PENDING)
    if bounded:
        messages = messages.filter(created_at__lt=before)
    return messages.order_by("-created_at").values_list("role", "content", named=True)[:limit]


_THREAD_HISTORY = PreparedQuery(_thread_history)


def thread_earlier_than_window(
    *, thread: Thread, window: int, before: Message, limit: int = 200
) -> list[HistoryMessage]:
    """Finished messages older than the last ``window`` ones before ``before``, oldest first: their
    role and content only (the turn's running summary reads up to ``limit`` of them: as model
    instances, with their JSON columns decoded, they were a quarter of a long thread's turn CPU)."""
    rows = _THREAD_EARLIER.run(
        shape={"window": window, "limit": limit}, thread_id=thread.pk, before=before.created_at
    )
    return list(reversed(rows))


def _thread_earlier(*, thread_id: Any, window: int, limit: int, before: datetime) -> QuerySet[Message, Any]:
    return (
        Message.objects.filter(thread_id=thread_id, created_at__lt=before)
        .exclude(status=Message.Status.PENDING)
        .order_by("-created_at")
        .values_list("role", "content", named=True)[window : window + limit]
    )


_THREAD_EARLIER = PreparedQuery(_thread_earlier)


def messages_for_thread(*, thread: Thread) -> QuerySet[Message]:
    return Message.objects.filter(thread=thread).order_by("created_at")


def message_get_for_user(*, user: EndUser, message_id: object) -> Message:
    try:
        return Message.objects.select_related("session", "thread").get(
            user=user, pk=_uuid(message_id, "message")
        )
    except Message.DoesNotExist:
        raise NotFound(f"message {message_id} not found for this user") from None


def messages_after(*, user: EndUser, after: object | None, limit: int) -> tuple[list[Message], bool]:
    """The user's messages after message ``after`` (the latest ``limit`` when None), oldest first.

    Returns:
        ``(messages, complete)``; ``complete`` is False when more messages follow the ones returned.

    Raises:
        NotFound: ``after`` is not a message of this user.
    """
    mine = Message.objects.filter(user=user)
    if after is None:
        latest = list(mine.order_by("-created_at", "-id")[:limit])
        return latest[::-1], True
    anchor = message_get_for_user(user=user, message_id=after)
    later = mine.filter(
        Q(created_at__gt=anchor.created_at) | Q(created_at=anchor.created_at, id__gt=anchor.id)
    ).order_by("created_at", "id")
    rows = list(later[: limit + 1])
    return rows[:limit], len(rows) <= limit


_GLOBAL_MEMORY_FIELDS = ("id", "scope", "kind", "similarity")


def memories_for_client(memories: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The memories a reply used, as an end user's client may see them: the user's own as stored;
    any other (global) as id, scope, kind and similarity only, since its text came from other users'
    conversations."""
    return [
        m if m.get("scope") == "user" else {k: m[k] for k in _GLOBAL_MEMORY_FIELDS if k in m}
        for m in memories
    ]


def turn_result(
    *, message: Message, reply: Message | None = None, reply_read: bool = False
) -> dict[str, Any]:
    """The turn result of a user message: its decisions and, once done, the reply (looked up unless
    given, or ``reply_read``: the caller read it already, None when there is none)."""
    if reply is None and not reply_read:
        reply = Message.objects.filter(reply_to=message).first()
    result: dict[str, Any] = {
        "status": str(message.status),
        "message_id": str(message.id),
        "user_id": message.user.external_id,
        "session_id": str(message.session_id),
        "thread_id": str(message.thread_id) if message.thread_id else None,
        "thread_event": message.thread_event or None,
        "thread_confidence": message.thread_confidence,
        "intent": message.intent or None,
        "confidence": message.confidence,
        "runners_up": message.intent_candidates,
        "escalated": message.escalated,
        "error": message.error or None,
    }
    if reply is not None:
        result.update(
            content=reply.content,
            reply_id=str(reply.id),
            offline=reply.offline,
            model=reply.model,
            usage=reply.usage,
            latency_ms=reply.latency_ms,
            memories_used=memories_for_client(reply.memories_used),
            escalated=message.escalated or reply.escalated,
            handled_by=reply.handled_by,
            llm_latency_ms=reply.llm_latency_ms,
            reply_confidence=reply.confidence,
        )
    elif message.status == Message.Status.DONE and message.handled_by:
        # A turn that ended without a bot reply (a human holds the thread): it says who handles it.
        result.update(content=None, handled_by=message.handled_by)
    return result


def _turn_message(*, message_id: uuid.UUID) -> QuerySet[Message]:
    return Message.objects.select_related("user", "reply").filter(pk=message_id)


# Read for every REST turn (its result) and every resent chat message: compiled once per connection.
_TURN_MESSAGE = PreparedQuery(_turn_message)


def turn_result_for(*, message_id: uuid.UUID | str) -> dict[str, Any]:
    """``turn_result`` of a stored user message, read afresh by id: the message, its user and its
    reply in one query.

    Raises:
        Message.DoesNotExist: no message has this id.
    """
    try:
        pk = message_id if isinstance(message_id, uuid.UUID) else uuid.UUID(str(message_id))
    except ValueError:
        raise Message.DoesNotExist(f"no message {message_id!r}") from None
    rows = _TURN_MESSAGE.run(message_id=pk)
    if not rows:
        raise Message.DoesNotExist(f"no message {message_id!r}")
    message = rows[0]
    try:
        reply: Message | None = message.reply
    except Message.reply.RelatedObjectDoesNotExist:
        reply = None
    return turn_result(message=message, reply=reply, reply_read=True)


# Thread changes a chat client is told of as "thread" events (a follow-up changes nothing visible).
THREAD_EVENTS_SHOWN = frozenset({"NEW_TOPIC", "RETURN", "RESOLUTION"})


def _thread_shown(*, thread_id: uuid.UUID) -> QuerySet[Thread, Any]:
    return Thread.objects.filter(pk=thread_id).values("status", "topic")[:1]


# Read after most Celery turns (a new topic, a return, a resolution): compiled once per process.
_THREAD_SHOWN = PreparedQuery(_thread_shown)


def thread_change_shown(*, result: dict[str, Any]) -> dict[str, Any] | None:
    """The ``thread`` event of a finished turn (``event``, ``thread_id``, ``status``, ``topic``), or
    None when the turn only followed up on a thread."""
    if result.get("thread_event") not in THREAD_EVENTS_SHOWN or not result.get("thread_id"):
        return None
    try:
        thread_id = uuid.UUID(str(result["thread_id"]))
    except ValueError:
        return None
    rows = _THREAD_SHOWN.run(thread_id=thread_id)
    if not rows:
        return None
    return {"event": result["thread_event"], "thread_id": result["thread_id"], **rows[0]}


def thread_held_by_human(*, thread: Thread) -> bool:
    """Whether a human holds the thread (an open or claimed escalation): the bot stays silent in it."""
    return Escalation.objects.filter(thread=thread).exclude(status=Escalation.Status.RESOLVED).exists()


def escalation_unresolved_for_thread(*, thread: Thread) -> Escalation | None:
    """The thread's open or claimed escalation, if any (at most one exists)."""
    return Escalation.objects.filter(thread=thread).exclude(status=Escalation.Status.RESOLVED).first()


def messages_unanswered_by_agent() -> list[dict[str, Any]]:
    """User messages waiting for their turn, per agent and status (``pending``, ``processing``).

    Each row: ``agent``, ``status``, ``count`` and ``oldest`` (the oldest one's ``created_at``). One
    aggregate over the partial index ``conversations_message_unanswered`` (migration 0008): cheap
    enough for every scrape.
    """
    from django.db.models import Count, Min

    rows = (
        Message.objects.filter(
            role=Message.Role.USER, status__in=[Message.Status.PENDING, Message.Status.PROCESSING]
        )
        .values("user__agent__name", "status")
        .annotate(count=Count("id"), oldest=Min("created_at"))
        .order_by()
    )
    return [
        {"agent": r["user__agent__name"], "status": r["status"], "count": r["count"], "oldest": r["oldest"]}
        for r in rows
    ]
