"""Writes to users' conversations: sessions, threads, messages, API keys."""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, NamedTuple

import numpy as np
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q, QuerySet
from django.utils import timezone

from agentflow import prepared
from agentflow.embeddings import get_embedder
from agentflow.errors import InvalidInput, NotFound, RateLimited
from agentflow.jobs import queue_on_commit
from agentflow.prepared import PreparedQuery
from agentflow.validation import clean_client_message_id, clean_message, clean_user_id

from .audit import audit_record
from .events import message_payload, publish_on_commit
from .message_sql import Snapshot, message_snapshot, message_store_live, store_usable
from .models import (
    Agent,
    ApiKey,
    AuditEvent,
    ChatSession,
    EndUser,
    Message,
    StaffUser,
    Thread,
    ThreadActivity,
)
from .ratelimit import user_message_give_back, user_message_take
from .thread_features import content_words
from .turn_results import turn_settled_on_commit

logger = logging.getLogger(__name__)


def _end_user(*, agent_id: int, external_id: str) -> QuerySet[EndUser]:
    return EndUser.objects.filter(agent_id=agent_id, external_id=external_id)[:1]


# Read on every WebSocket connection and on a user's first message of a session: compiled once
# per process (agentflow.prepared), as the INSERT of a new user is.
_END_USER = PreparedQuery(_end_user)


def user_get_or_create(*, agent_id: int, external_id: str) -> EndUser:
    """The agent's end user with this host id, created on their first message.

    ``get_or_create``'s steps with compiled statements: the read, else the insert in a savepoint,
    and the read again when another request inserted the same user first.
    """
    return _user_get_or_create(agent_id=agent_id, external_id=external_id)[0]


def _user_get_or_create(
    *, agent_id: int, external_id: str, seen_at: datetime | None = None, read_first: bool = True
) -> tuple[EndUser, bool]:
    """``user_get_or_create`` and whether this call inserted the user (with ``last_seen_at`` =
    ``seen_at``). ``read_first`` False: the caller has just read that there is none (the insert
    first; the read only if another request inserted the user meanwhile)."""
    external_id = clean_user_id(external_id)
    if read_first:
        found = _END_USER.run(agent_id=agent_id, external_id=external_id)
        if found:
            return found[0], False
    try:
        with transaction.atomic():
            created = prepared.create(
                EndUser, agent_id=agent_id, external_id=external_id, last_seen_at=seen_at
            )
            return created, True
    except IntegrityError:
        found = _END_USER.run(agent_id=agent_id, external_id=external_id)
        if found:
            return found[0], False
        raise


def user_lock(*, user: EndUser) -> None:
    """Serialise this user's turn decisions until the current transaction ends: the user's row lock.

    Two messages sent together ("double-texting") then never both open a thread for one topic. The
    turn takes the same lock with the message it reads (``turns.message_for_turn(lock=True)``), in
    one statement; a new session is opened under it too (``message_receive``). ``FOR NO KEY
    UPDATE``: the foreign-key checks of other transactions (``FOR KEY SHARE`` on the user, at their
    commit) do not wait for it, so a turn finishing and the next one placing cannot deadlock.
    """
    list(EndUser.objects.select_for_update(no_key=True).filter(pk=user.pk).values_list("pk", flat=True))


def _user_live_session(*, user_id: int, now: datetime) -> QuerySet[ChatSession]:
    return ChatSession.objects.filter(
        user_id=user_id, status=ChatSession.Status.ACTIVE, expires_at__gt=now
    ).order_by("-last_activity_at")[:1]


def _user_ended_sessions(*, user_id: int, now: datetime, batch: int) -> QuerySet[ChatSession]:
    return ChatSession.objects.filter(
        user_id=user_id, status=ChatSession.Status.ACTIVE, expires_at__lte=now
    ).order_by("expires_at")[:batch]


# Read when a user's message opens a session: compiled once per process (agentflow.prepared).
_USER_LIVE_SESSION = PreparedQuery(_user_live_session)
_USER_ENDED_SESSIONS = PreparedQuery(_user_ended_sessions)


def session_for_turn(*, user: EndUser, ttl_seconds: int, now: datetime) -> ChatSession:
    """The user's live session, or a new one if the last expired (expired ones are marked).

    Call in a transaction that holds the user's row lock (``message_receive`` takes it), so two
    messages arriving together open one session.
    """
    rows = _USER_LIVE_SESSION.run(user_id=user.pk, now=now)
    live = rows[0] if rows else None
    if live is not None:
        session_extend(session=live, now=now)
        return live
    # Sessions are marked expired here, when the next one opens, and by the beat's housekeeping for
    # users who never come back (``conversations.housekeeping``): never on every message.
    sessions_mark_expired(user=user, now=now)
    return session_new(user=user, ttl_seconds=ttl_seconds, now=now)


def session_new(*, user: EndUser, ttl_seconds: int, now: datetime) -> ChatSession:
    """Open a session for ``user`` (who has no live one: ``session_for_turn`` looked)."""
    return prepared.create(
        ChatSession,
        user=user,
        ttl_seconds=ttl_seconds,
        last_activity_at=now,
        expires_at=now + timedelta(seconds=ttl_seconds),
    )


# A session's expiry is pushed forward only once it has slid this far (at most a tenth of the TTL):
# the write was one of a turn's statements on nearly every message of a conversation.
EXTEND_EVERY = timedelta(minutes=1)


def session_extend(*, session: ChatSession, now: datetime) -> None:
    """A message arrived in a live session: its expiry slides to ``ttl_seconds`` from now.

    Written only when the new expiry is later than the stored one by ``EXTEND_EVERY`` (or a tenth
    of the TTL, if less): the session then ends at most that much earlier than a full TTL after
    its last message, and ``last_activity_at`` lags by as much.
    """
    ttl = timedelta(seconds=session.ttl_seconds)
    if now + ttl - session.expires_at < min(EXTEND_EVERY, ttl / 10):
        return
    session.last_activity_at = now
    session.expires_at = now + timedelta(seconds=session.ttl_seconds)
    prepared.save_fields(session, ["last_activity_at", "expires_at"])


def sessions_mark_expired(*, now: datetime, user: EndUser | None = None, batch: int = 1000) -> int:
    """Mark active sessions past their expiry expired (one user's, or everyone's: at most ``batch``
    a call) and queue their memory."""
    if user is not None:  # a user's next session opens (a message): the compiled read
        ended_ids = [s.pk for s in _USER_ENDED_SESSIONS.run(shape={"batch": batch}, user_id=user.pk, now=now)]
    else:
        ended = ChatSession.objects.filter(status=ChatSession.Status.ACTIVE, expires_at__lte=now)
        ended_ids = list(ended.order_by("expires_at").values_list("pk", flat=True)[:batch])
    if not ended_ids:
        return 0
    count = ChatSession.objects.filter(pk__in=ended_ids, status=ChatSession.Status.ACTIVE).update(
        status=ChatSession.Status.EXPIRED, ended_at=F("expires_at")
    )
    for (
        session_id
    ) in ended_ids:  # memory.remember_session: what its unresolved threads tried (off the hot path)
        queue_on_commit("memory.remember_session", str(session_id))
    return count


# ``last_seen_at`` is written at most this often per user: it is for people reading the admin, and a
# write on every message was one of the turn's statements.
LAST_SEEN_EVERY = timedelta(minutes=1)


class AgentChanged(Exception):
    """The agent's stored version is not the one the caller's limits were read for (or the agent is
    gone): read its limits again (``conversations.agents.agent_settings``) and call once more."""

    def __init__(self, version: int | None) -> None:
        super().__init__(f"the agent's stored version is {version}")
        self.version = version


def rate_limit_check(*, user_id: str, per_minute: int, now: datetime, burst: int | None = None) -> None:
    """The user's message bucket (a token bucket in Redis, ``conversations.ratelimit``).

    Raises:
        RateLimited: more than ``burst`` messages at once, or over ``per_minute`` a minute.
    """
    user_message_take(user_id=user_id, per_minute=per_minute, burst=burst, now=now.timestamp())


class Received(NamedTuple):
    """An incoming message as stored: ``run`` says whether its turn should be (re)started.

    A new message runs; a resend (same ``client_message_id``) of a failed one runs again; a resend of
    a pending, processing or finished one does not (its turn is under way or done).
    """

    message: Message
    created: bool

    @property
    def run(self) -> bool:
        return self.created or self.message.status == Message.Status.FAILED


def message_receive(
    *,
    agent_id: int,
    user_id: str,
    content: str,
    client_message_id: str | None = None,
    ttl_seconds: int,
    max_chars: int,
    rate_per_minute: int = 0,
    rate_burst: int | None = None,
    agent_version: int | None = None,
    shown_by: str | None = None,
) -> Received:
    """Validate and store an incoming user message, pending its turn.

    Sending the same ``client_message_id`` twice returns the first message (``created`` False).
    ``rate_per_minute`` and ``rate_burst`` are the user's message bucket (``burst`` None: the same
    as ``rate_per_minute``; 0 per minute: no limit). ``agent_version``: the version of the agent the
    limits were read for, checked against the stored one (None: not checked). ``shown_by``: the
    channel of the chat socket that sent the message and shows it itself (``ChatConsumer``), left
    out of the ``user_message`` announcement to the user's connections.

    The rules, in this order as clients see them: the ids and the message are checked; a resend
    gets its first copy (whatever the rate limit); the rate limit; the store. In a live session
    (nearly every message) that is one statement (``message_sql.message_store_live``: the snapshot
    read and the ``INSERT``, in autocommit), the message's checks and its rate-limit token taken
    just before it. When that statement stores nothing (a resend, a newer agent version, no live
    session), its snapshot decides as a separate read would; the token goes back unless the message
    is then stored. A message the checks refuse is read first (``message_snapshot``): a newer
    agent version may allow it, a resend is answered. A message that opens a session runs in a
    transaction under the user's row lock.

    Returns:
        The stored message, whether it is new, and whether its turn should run (``Received.run``).

    Raises:
        InvalidInput: nothing was stored.
        RateLimited: nothing was stored.
        AgentChanged: ``agent_version`` is not the stored one, or the agent is gone; nothing stored.
        NotFound: the agent is gone (``agent_version`` None); nothing stored.
    """
    external_id = clean_user_id(user_id)
    client_id = clean_client_message_id(client_message_id)
    now = timezone.now()
    bucket = _Bucket(external_id, rate_per_minute, rate_burst, now)
    fields = {
        "role": Message.Role.USER,
        "status": Message.Status.PENDING,
        "client_message_id": client_id,
    }
    refused: RateLimited | None = None
    taken = read = False
    snap: Snapshot | None = None
    if store_usable():
        try:
            text = clean_message(content, max_chars=max_chars)
            bucket.take()
        except InvalidInput:
            pass  # read first: a newer agent version's limits may allow it (else refused below)
        except RateLimited as exc:
            refused = exc  # read first: a resend of a stored message is answered, not refused
        else:
            taken = True
            try:
                stored = message_store_live(
                    agent_id=agent_id,
                    external_id=external_id,
                    client_id=client_id,
                    agent_version=agent_version,
                    now=now,
                    values={"content": text, **fields},
                    seen_every=LAST_SEEN_EVERY,
                    extend_every=EXTEND_EVERY,
                )
            except BaseException:
                bucket.give_back()
                raise
            if stored.message is not None:
                return _received_new(stored.message, shown_by=shown_by)
            snap, read = stored.snapshot, True
            stores = (  # below: it opens a session, or another process stored its copy meanwhile
                snap is not None
                and (agent_version is None or snap.agent_version == agent_version)
                and snap.duplicate is None
            )
            if not stores:
                bucket.give_back()
                taken = False
    if not read:
        snap = message_snapshot(agent_id=agent_id, external_id=external_id, client_id=client_id, now=now)
    if snap is None:
        if agent_version is not None:
            raise AgentChanged(None)
        raise NotFound(f"agent {agent_id} not found")
    if agent_version is not None and snap.agent_version != agent_version:
        raise AgentChanged(snap.agent_version)
    text = clean_message(content, max_chars=max_chars)
    if snap.duplicate is not None:
        return Received(snap.duplicate, created=False)
    if refused is not None:
        raise refused
    if not taken:
        bucket.take()
    fields["content"] = text
    try:
        if snap.session is not None and snap.user is not None:
            # A session to extend: no lock needed, nothing is opened. Each write its own statement;
            # the two updates are needed at most once a minute per user.
            user, session = snap.user, snap.session
            session_extend(session=session, now=now)
            if user.last_seen_at is None or user.last_seen_at < now - LAST_SEEN_EVERY:
                user.last_seen_at = now
                prepared.save_fields(user, ["last_seen_at"])
            if connection.in_atomic_block:  # a caller's transaction: a failed INSERT must not break it
                with transaction.atomic():
                    message = prepared.create(Message, user=user, session=session, **fields)
            else:
                message = prepared.create(Message, user=user, session=session, **fields)
        else:
            with transaction.atomic():
                if snap.user is not None:
                    user, new_user = snap.user, False
                else:
                    user, new_user = _user_get_or_create(  # the snapshot read none
                        agent_id=agent_id, external_id=external_id, seen_at=now, read_first=False
                    )
                if new_user:
                    # Inserted by this transaction: no session can exist yet (nothing to read), and
                    # the row is ours until commit (a simultaneous first message waits on the
                    # unique index, then reads this user and the session opened here).
                    session = session_new(user=user, ttl_seconds=ttl_seconds, now=now)
                else:
                    # The UPDATE locks the user's row until commit: simultaneous first messages (or
                    # messages after an expiry) open one session between them.
                    user.last_seen_at = now
                    prepared.save_fields(user, ["last_seen_at"])
                    session = session_for_turn(user=user, ttl_seconds=ttl_seconds, now=now)
                message = prepared.create(Message, user=user, session=session, **fields)
    except IntegrityError:
        # The same client id raced in from another process: the first one wins (a resend: its token
        # goes back).
        existing = Message.objects.filter(
            user__agent_id=agent_id, user__external_id=external_id, client_message_id=client_id
        ).first()
        bucket.give_back()
        if not client_id or existing is None:
            raise
        return Received(existing, created=False)
    return _received_new(message, shown_by=shown_by)


def _received_new(message: Message, *, shown_by: str | None = None) -> Received:
    # Every live connection of the user (other tabs, staff watching) sees the message arrive; the
    # socket that sent it (``shown_by``) shows it itself.
    publish_on_commit(
        user_pk=message.user_id,
        event={"kind": "user_message", **message_payload(message)},
        skip=shown_by,
    )
    return Received(message, created=True)


class _Bucket(NamedTuple):
    """A user's message bucket as ``message_receive`` was given it."""

    user_id: str
    per_minute: int
    burst: int | None
    now: datetime

    def take(self) -> None:
        rate_limit_check(user_id=self.user_id, per_minute=self.per_minute, burst=self.burst, now=self.now)

    def give_back(self) -> None:
        """The token back: the message was not stored. A Redis failure here is logged, not raised
        (the message's own outcome stands; the user's bucket is one token short for a while)."""
        try:
            user_message_give_back(
                user_id=self.user_id, per_minute=self.per_minute, burst=self.burst, now=self.now.timestamp()
            )
        except Exception:
            logger.warning("could not give a message token back to the rate limit", exc_info=True)


def user_mark_read(*, user: EndUser, message_id: Any) -> Message:
    """Record that the user's client has shown ``message_id``; the read position only moves forward.

    Raises:
        NotFound: it is not a message of this user.
    """
    from .selectors import message_get_for_user

    message = message_get_for_user(user=user, message_id=message_id)
    current = user.last_read_message_id
    newer = (
        current is None
        or not Message.objects.filter(pk=current, user=user, created_at__gte=message.created_at).exists()
    )
    if newer:
        now = timezone.now()
        EndUser.objects.filter(pk=user.pk).update(last_read_message_id=message.pk, last_read_at=now)
        user.last_read_message_id, user.last_read_at = message.pk, now
    return message


def message_claim(*, message_id: Any, now: datetime, stale_after: timedelta) -> bool:
    """Mark a message as being processed. False if another worker holds it or it is done.

    A claim older than ``stale_after`` (its worker died) can be taken over; a failed turn can be retried.
    """
    claimable = Q(status__in=[Message.Status.PENDING, Message.Status.FAILED]) | Q(
        status=Message.Status.PROCESSING, processing_started_at__lt=now - stale_after
    )
    claimed = Message.objects.filter(claimable, pk=message_id, role=Message.Role.USER).update(
        status=Message.Status.PROCESSING, processing_started_at=now, error=""
    )
    return claimed == 1


def message_release(*, message_id: Any) -> None:
    """Give a claimed message back (its task retries it: an earlier message, an LLM or database error).

    ``processing_started_at`` keeps when it was given back: the recovery sweep leaves a message alone
    that long after (its task is about to retry it) instead of re-queueing a second copy.
    """
    Message.objects.filter(pk=message_id, status=Message.Status.PROCESSING).update(
        status=Message.Status.PENDING, processing_started_at=timezone.now()
    )


def message_fail(*, message_id: Any, error: str) -> None:
    """Mark a turn failed for good (a resend retries it); a request waiting on it wakes up."""
    failed = (
        Message.objects.filter(pk=message_id)
        .exclude(status=Message.Status.DONE)
        .update(status=Message.Status.FAILED, error=error[:2000])
    )
    if failed:
        turn_settled_on_commit(message_id=message_id, status=Message.Status.FAILED)


VOCABULARY_LIMIT = 300


def _fold(topic: np.ndarray | None, weight: int, vector: np.ndarray) -> np.ndarray:
    """Running mean of the thread's user-message embeddings: its topic."""
    if topic is None or weight == 0:
        return vector
    return (np.asarray(topic) * weight + vector) / (weight + 1)


def _vocabulary(existing: list[str], text: str) -> list[str]:
    words = list(dict.fromkeys([*existing, *sorted(content_words(text))]))
    return words[-VOCABULARY_LIMIT:]


def thread_new(
    *, user: EndUser, session: ChatSession, text: str, embedding: np.ndarray, now: datetime, intent: str = ""
) -> Thread:
    """A thread opened by a user message, not yet stored (``thread_open`` stores it; a turn's
    placement stores it with the message's other writes, ``turns.message_place``)."""
    return Thread(
        user=user,
        session=session,
        topic=text[:255],
        intent=intent,
        topic_embedding=embedding,
        opening_embedding=embedding,
        last_user_embedding=embedding,
        vocabulary=_vocabulary([], text),
        topic_weight=1,
        last_activity_at=now,
    )


def thread_open(
    *, user: EndUser, session: ChatSession, text: str, embedding: np.ndarray, now: datetime, intent: str = ""
) -> Thread:
    thread = thread_new(user=user, session=session, text=text, embedding=embedding, now=now, intent=intent)
    prepared.write_together(prepared.Insert(thread))
    return thread


def thread_take_message(*, thread: Thread, text: str, embedding: np.ndarray, now: datetime) -> list[str]:
    """``thread_add_message``'s changes to ``thread``, not yet stored: the fields to save."""
    thread.last_activity_at = now
    thread.topic_embedding = _fold(thread.topic_embedding, thread.topic_weight, embedding)
    thread.topic_weight += 1
    thread.last_user_embedding = embedding
    thread.vocabulary = _vocabulary(thread.vocabulary, text)
    fields = ["last_activity_at", "topic_embedding", "topic_weight", "last_user_embedding", "vocabulary"]
    if thread.status != Thread.Status.OPEN:
        thread.status = Thread.Status.OPEN
        thread.resolved_at = None
        thread.resolution = ""  # the old resolution no longer describes a thread that is open again
        fields += ["status", "resolved_at", "resolution"]
    return fields


def thread_add_message(*, thread: Thread, text: str, embedding: np.ndarray, now: datetime) -> Thread:
    """A user message joined the thread: fold it into the topic; wake the thread if dormant or resolved."""
    prepared.save_fields(thread, thread_take_message(thread=thread, text=text, embedding=embedding, now=now))
    return thread


REPLY_FIELDS = ("last_activity_at", "last_assistant_text", "vocabulary")


def _thread_take_reply(*, thread: Thread, text: str, now: datetime) -> None:
    thread.last_activity_at = now
    thread.last_assistant_text = text[:2000]
    thread.vocabulary = _vocabulary(thread.vocabulary, text)


def thread_add_reply(*, thread: Thread, text: str, now: datetime) -> Thread:
    """An assistant or human-agent message joined the thread: it is context for the next decision."""
    _thread_take_reply(thread=thread, text=text, now=now)
    thread.save(update_fields=list(REPLY_FIELDS))
    return thread


def turn_mark_done_with_reply(
    *,
    message: Message,
    reply: Message,
    thread: Thread,
    escalated: bool,
    now: datetime,
    also: Sequence[prepared.Write] = (),
) -> None:
    """Store ``reply`` (a new instance), mark its user message done and add the reply to the thread
    (as ``thread_add_reply``; an escalated reply also marks the thread escalated): one statement
    (``prepared.write_together``), with the caller's writes ``also`` (of other rows). Call in a
    transaction.

    Raises:
        IntegrityError: the message already has its reply (another run of the turn stored it);
            nothing of the three writes is stored.
    """
    message.status, message.escalated, message.error = Message.Status.DONE, escalated, ""
    _thread_take_reply(thread=thread, text=reply.content, now=now)
    thread_fields = list(REPLY_FIELDS)
    if escalated and not thread.escalated:
        thread.escalated = True
        thread_fields.append("escalated")
    prepared.write_together(
        prepared.Insert(reply),
        prepared.Update(message, ("status", "escalated", "error")),
        prepared.Update(thread, thread_fields),
        *also,
    )


def thread_take_resolution(
    *, thread: Thread, by: Message, embedding: np.ndarray | None, now: datetime
) -> list[str]:
    """``thread_resolve``'s changes to ``thread``, not yet stored: the fields to save."""
    thread.status = Thread.Status.RESOLVED
    thread.resolved_at = now
    thread.resolution = by.content[:2000]
    thread.last_activity_at = now
    fields = ["status", "resolved_at", "resolution", "last_activity_at"]
    if embedding is not None:
        thread.last_user_embedding = embedding
        fields.append("last_user_embedding")
    return fields


def thread_resolve(*, thread: Thread, by: Message, embedding: np.ndarray | None, now: datetime) -> Thread:
    """Mark a thread resolved, keeping the message that resolved it."""
    prepared.save_fields(thread, thread_take_resolution(thread=thread, by=by, embedding=embedding, now=now))
    return thread


def threads_mark_dormant(
    *, user: EndUser, idle: timedelta, now: datetime, threads: list[Thread] | None = None
) -> int:
    """Mark the user's idle open threads dormant, recording a ``dormant`` activity on each.

    ``threads``: the user's threads as the caller just read them (a turn's candidates, under the
    user's lock): only those are looked at, and nothing is read or written when none is idle. The
    beat's ``threads_mark_dormant_all`` marks the rest.
    """
    if threads is None:
        ids = list(
            Thread.objects.filter(
                user=user, status=Thread.Status.OPEN, last_activity_at__lt=now - idle
            ).values_list("pk", flat=True)
        )
    else:
        idle_ones = [t for t in threads if t.status == Thread.Status.OPEN and t.last_activity_at < now - idle]
        for thread in idle_ones:
            thread.status = Thread.Status.DORMANT
        ids = [t.pk for t in idle_ones]
    if not ids:
        return 0
    with transaction.atomic():
        count = Thread.objects.filter(pk__in=ids, status=Thread.Status.OPEN).update(
            status=Thread.Status.DORMANT
        )
        ThreadActivity.objects.bulk_create(
            ThreadActivity(thread_id=pk, user_id=user.pk, kind=ThreadActivity.Kind.DORMANT) for pk in ids
        )
    return count


def threads_mark_dormant_all(*, idle_by_agent: dict[int, timedelta], now: datetime, batch: int = 500) -> int:
    """The beat's part: mark every agent's idle open threads dormant (``idle_by_agent``: each agent's
    inactivity threshold), at most ``batch`` per agent a run, each with its ``dormant`` activity."""
    count = 0
    for agent_id, idle in idle_by_agent.items():
        with transaction.atomic():
            rows = list(
                Thread.objects.select_for_update(skip_locked=True)
                .filter(user__agent_id=agent_id, status=Thread.Status.OPEN, last_activity_at__lt=now - idle)
                .values_list("pk", "user_id")[:batch]
            )
            if not rows:
                continue
            count += Thread.objects.filter(pk__in=[pk for pk, _ in rows]).update(status=Thread.Status.DORMANT)
            ThreadActivity.objects.bulk_create(
                ThreadActivity(thread_id=pk, user_id=user_id, kind=ThreadActivity.Kind.DORMANT)
                for pk, user_id in rows
            )
    return count


# --- thread activities and staff actions -------------------------------------------------------


def thread_activity_new(
    *,
    thread: Thread,
    kind: str,
    message: Message | None = None,
    actor: str = ThreadActivity.Actor.SYSTEM,
    staff_user: StaffUser | None = None,
    detail: dict[str, Any] | None = None,
) -> ThreadActivity:
    """One event of a thread's life, not yet stored (``thread_activity_record`` stores it)."""
    return ThreadActivity(
        thread=thread,
        user_id=thread.user_id,
        kind=kind,
        message=message,
        actor=actor,
        staff_user=staff_user,
        detail=detail or {},
    )


def thread_activity_record(
    *,
    thread: Thread,
    kind: str,
    message: Message | None = None,
    actor: str = ThreadActivity.Actor.SYSTEM,
    staff_user: StaffUser | None = None,
    detail: dict[str, Any] | None = None,
) -> ThreadActivity:
    """Store one event of a thread's life, for its timeline and for analytics."""
    activity = thread_activity_new(
        thread=thread, kind=kind, message=message, actor=actor, staff_user=staff_user, detail=detail
    )
    prepared.write_together(prepared.Insert(activity))
    return activity


def _locked(thread: Thread) -> Thread:
    return Thread.objects.select_for_update().get(pk=thread.pk)


def thread_staff_resolve(*, thread: Thread, staff_user: StaffUser, note: str = "") -> Thread:
    """Staff mark a thread resolved. A thread already resolved is left as it is (nothing recorded).

    ``last_activity_at`` is the user's activity, so a staff action leaves it alone.
    """
    with transaction.atomic():
        thread = _locked(thread)
        if thread.status == Thread.Status.RESOLVED:
            return thread
        thread.status = Thread.Status.RESOLVED
        thread.resolved_at = timezone.now()
        thread.resolution = note[:2000] or "resolved by staff"
        thread.save(update_fields=["status", "resolved_at", "resolution"])
        thread_activity_record(
            thread=thread,
            kind=ThreadActivity.Kind.RESOLVED,
            actor=ThreadActivity.Actor.STAFF,
            staff_user=staff_user,
            detail={"note": note[:2000]} if note else None,
        )
        audit_record(
            action=AuditEvent.Action.THREAD_RESOLVE,
            staff_user=staff_user,
            target=thread,
            end_user_pk=thread.user_id,
            detail={"note": note[:2000]} if note else None,
        )
        _publish_thread_change(thread, "resolved")
    return thread


def _publish_thread_change(thread: Thread, event: str) -> None:
    """Tell the user's live connections that staff changed one of their threads."""
    publish_on_commit(
        user_pk=thread.user_id,
        event={
            "kind": "thread",
            "event": event,
            "thread_id": str(thread.pk),
            "status": thread.status,
            "topic": thread.topic,
        },
    )


def thread_staff_reopen(*, thread: Thread, staff_user: StaffUser) -> Thread:
    """Staff reopen a resolved or dormant thread. An open thread is left as it is (nothing recorded)."""
    with transaction.atomic():
        thread = _locked(thread)
        if thread.status == Thread.Status.OPEN:
            return thread
        previous = thread.status
        thread.status = Thread.Status.OPEN
        thread.resolved_at = None
        thread.resolution = ""
        thread.save(update_fields=["status", "resolved_at", "resolution"])
        thread_activity_record(
            thread=thread,
            kind=ThreadActivity.Kind.REOPENED,
            actor=ThreadActivity.Actor.STAFF,
            staff_user=staff_user,
            detail={"from": previous},
        )
        audit_record(
            action=AuditEvent.Action.THREAD_REOPEN,
            staff_user=staff_user,
            target=thread,
            end_user_pk=thread.user_id,
            detail={"from": previous},
        )
        _publish_thread_change(thread, "reopened")
    return thread


def _weighted_topic(target: Thread, source: Thread) -> tuple[np.ndarray | None, int]:
    """The topic of two threads together: their topic embeddings' mean, weighted by user messages."""
    weight = target.topic_weight + source.topic_weight
    if source.topic_embedding is None:
        return target.topic_embedding, weight
    if target.topic_embedding is None:
        return source.topic_embedding, weight
    t, s = np.asarray(target.topic_embedding), np.asarray(source.topic_embedding)
    if weight == 0:
        return (t + s) / 2, 0
    return (t * target.topic_weight + s * source.topic_weight) / weight, weight


def threads_merge(*, source: Thread, target: Thread, staff_user: StaffUser) -> Thread:
    """Move every message of ``source`` into ``target`` and fold the source's topic into it.

    The emptied source is marked resolved ("merged into <target id>") and loses its topic embedding,
    so thread detection never offers it as a candidate again.

    Raises:
        InvalidInput: the threads are one thread or belong to different users; nothing changed.
    """
    if source.pk == target.pk:
        raise InvalidInput("a thread cannot be merged into itself", field="thread")
    with transaction.atomic():
        pair = Thread.objects.select_for_update().filter(pk__in=[source.pk, target.pk]).order_by("pk")
        locked = {t.pk: t for t in pair}
        source, target = locked[source.pk], locked[target.pk]
        if source.user_id != target.user_id:
            raise InvalidInput("only threads of the same user can be merged", field="thread")
        moved = Message.objects.filter(thread=source).update(thread=target)
        target.topic_embedding, target.topic_weight = _weighted_topic(target, source)
        if target.opening_embedding is None:
            target.opening_embedding = source.opening_embedding
        if source.last_activity_at > target.last_activity_at:
            target.last_activity_at = source.last_activity_at
            target.last_user_embedding = source.last_user_embedding
            target.last_assistant_text = source.last_assistant_text
        target.vocabulary = list(dict.fromkeys([*target.vocabulary, *source.vocabulary]))[-VOCABULARY_LIMIT:]
        target.escalated = target.escalated or source.escalated
        target.save(
            update_fields=[
                "topic_embedding",
                "topic_weight",
                "opening_embedding",
                "last_activity_at",
                "last_user_embedding",
                "last_assistant_text",
                "vocabulary",
                "escalated",
            ]
        )
        source.status = Thread.Status.RESOLVED
        source.resolved_at = timezone.now()
        source.resolution = f"merged into {target.pk}"
        source.topic_embedding = None
        source.topic_weight = 0
        source.save(update_fields=["status", "resolved_at", "resolution", "topic_embedding", "topic_weight"])
        detail = {"source": str(source.pk), "target": str(target.pk), "messages": moved}
        for thread in (source, target):
            thread_activity_record(
                thread=thread,
                kind=ThreadActivity.Kind.MERGED,
                actor=ThreadActivity.Actor.STAFF,
                staff_user=staff_user,
                detail=detail,
            )
        audit_record(
            action=AuditEvent.Action.THREAD_MERGE,
            staff_user=staff_user,
            target=target,
            end_user_pk=target.user_id,
            detail=detail,
        )
    return target


def thread_split(*, message: Message, staff_user: StaffUser) -> Thread:
    """Move a user message and every later message of its thread into a new thread of their own.

    The new thread's topic is the message: its text and its embedding.

    Returns:
        The new thread.

    Raises:
        InvalidInput: the message is not a user message in a thread, or it is the thread's first
            message (the split would leave an empty thread); nothing changed.
    """
    if message.role != Message.Role.USER or message.thread_id is None:
        raise InvalidInput("only a user message in a thread can start a new thread", field="message")
    embedding = get_embedder().embed_one(message.content)  # slow: outside the transaction
    with transaction.atomic():
        original = Thread.objects.select_for_update().get(pk=message.thread_id)
        in_thread = Message.objects.filter(thread=original).order_by("created_at", "pk")
        first = in_thread.first()
        if first is None or first.pk == message.pk:
            raise InvalidInput("splitting at a thread's first message would leave it empty", field="message")
        moving = list(in_thread.filter(Q(created_at__gt=message.created_at) | Q(pk=message.pk)))
        vocabulary: list[str] = []
        for m in moving:
            vocabulary = _vocabulary(vocabulary, m.content)
        replies = [m for m in moving if m.role != Message.Role.USER]
        new = Thread.objects.create(
            user_id=original.user_id,
            session_id=message.session_id,
            topic=message.content[:255],
            intent=message.intent,
            topic_embedding=embedding,
            opening_embedding=embedding,
            last_user_embedding=embedding,
            topic_weight=1,
            vocabulary=vocabulary,
            last_assistant_text=replies[-1].content[:2000] if replies else "",
            last_activity_at=moving[-1].created_at,
        )
        Message.objects.filter(pk__in=[m.pk for m in moving]).update(thread=new)
        remaining = Message.objects.filter(thread=original).order_by("-created_at").first()
        assert remaining is not None  # the first message stays
        original.last_activity_at = remaining.created_at
        original.save(update_fields=["last_activity_at"])
        detail = {"from": str(original.pk), "to": str(new.pk), "messages": len(moving)}
        for thread in (original, new):
            thread_activity_record(
                thread=thread,
                kind=ThreadActivity.Kind.SPLIT,
                message=message,
                actor=ThreadActivity.Actor.STAFF,
                staff_user=staff_user,
                detail=detail,
            )
        audit_record(
            action=AuditEvent.Action.THREAD_SPLIT,
            staff_user=staff_user,
            target=new,
            end_user_pk=new.user_id,
            detail={**detail, "message": str(message.pk)},
        )
    return new


def api_key_create(*, name: str, agent: Agent | None = None) -> tuple[ApiKey, str]:
    """Create a REST API key, for every agent or limited to ``agent``. The plain key is returned once
    and never stored."""
    name = (name or "").strip()
    if not name or len(name) > 100:
        raise InvalidInput("API key name must be 1-100 characters", field="name")
    plain = "afk_" + secrets.token_urlsafe(32)
    key = ApiKey.objects.create(
        name=name, prefix=plain[:12], key_hash=hashlib.sha256(plain.encode()).hexdigest(), agent=agent
    )
    return key, plain


API_KEY_USE_RESOLUTION = timedelta(minutes=1)


def _active_key(*, key_hash: str) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(key_hash=key_hash, active=True).order_by("pk")[:1]


# Checked on every REST call: compiled once per connection.
_ACTIVE_KEY = PreparedQuery(_active_key)


def api_key_check(*, plain: str) -> ApiKey | None:
    if not plain or len(plain) > 200:
        return None
    found = _ACTIVE_KEY.run(key_hash=hashlib.sha256(plain.encode()).hexdigest())
    key = found[0] if found else None
    now = timezone.now()
    # "Last used" to the minute: a busy key does not write its row (and commit) on every request.
    if key is not None and (key.last_used_at is None or now - key.last_used_at >= API_KEY_USE_RESOLUTION):
        ApiKey.objects.filter(pk=key.pk).update(last_used_at=now)
        key.last_used_at = now
    return key
