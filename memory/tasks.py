"""Celery tasks that write memories, off the turn's hot path.

Every task takes ids and is idempotent: a second run writes a near-duplicate of the first memory,
which ``memory_remember`` turns into an update.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

from celery import shared_task
from django.db.models import Q
from django.utils import timezone

from agentflow.errors import LLMError
from agentflow.jobs import handed_over
from agentflow.prepared import PreparedQuery
from agentflow.registry import agent_for
from conversations.models import ChatSession, EndUser, Message, Thread

from .services import memory_remember
from .sharing import global_lesson
from .writing import (
    had_real_exchange,
    llm_memory_summary,
    preference_statement,
    resolution_memory_text,
    session_memory_text,
)

logger = logging.getLogger("agentflow.memory")

SWEEP_EVERY = timedelta(minutes=10)  # how often beat runs memory.sweep_ended_sessions
SWEEP_WINDOW = 2 * SWEEP_EVERY  # each sweep looks this far back, so one late run misses nothing


def _agent_of(user: EndUser) -> Any:
    """The agent whose user this is, as this process runs it: its own memory settings, never a default."""
    return agent_for(user.agent.name, version=user.agent.version)


# What the memory's texts read of a thread's messages (memory.writing): a resolved thread's job runs
# once per resolution, over the whole thread; its five JSON columns, decoded per message, were most
# of that job's CPU. Another field, if ever read, is fetched by Django on first access.
_MEMORY_FIELDS = ("id", "role", "content", "thread_event", "reply_to", "handled_by", "created_at")


def _thread_messages_query(*, thread_id: Any) -> Any:
    return (
        Message.objects.filter(thread_id=thread_id)
        .exclude(role=Message.Role.SYSTEM)
        .only(*_MEMORY_FIELDS)
        .order_by("created_at")
    )


def _resolved_thread(*, thread_id: Any) -> Any:
    return Thread.objects.select_related("user", "user__agent").filter(
        pk=thread_id, status=Thread.Status.RESOLVED
    )[:1]


def _user_message(*, message_id: Any) -> Any:
    return Message.objects.select_related("user", "user__agent").filter(
        pk=message_id, role=Message.Role.USER
    )[:1]


# The memory jobs' reads, compiled once per connection (agentflow.prepared): building and compiling
# them cost the jobs more CPU than running them.
_THREAD_MESSAGES = PreparedQuery(_thread_messages_query)
_RESOLVED_THREAD = PreparedQuery(_resolved_thread)
_USER_MESSAGE = PreparedQuery(_user_message)


def _thread_messages(thread: Thread) -> list[Message]:
    messages: list[Message] = _THREAD_MESSAGES.run(thread_id=thread.pk)
    return messages


def _first(query: PreparedQuery, model: Any, **ids: Any) -> Any:
    """The row of ``query`` for these primary keys, or None (a malformed id raises Django's
    ``ValidationError``, as the ORM's filter did)."""
    rows = query.run(**{name: model._meta.pk.to_python(value) for name, value in ids.items()})
    return rows[0] if rows else None


def _memory_text(
    agent: Any, *, thread: Thread, messages: list[Message], extractive: str, ended: str
) -> tuple[str, str]:
    """The LLM's "Problem / What worked / Outcome" summary when online, else the extractive text.

    Returns:
        ``(text, "llm" | "extractive")``.
    """
    if agent.offline:
        return extractive, "extractive"
    # On the worker thread's loop (it keeps its LLM clients), holding no database connection meanwhile.
    from agentflow.loops import run_off_database

    try:
        summary = run_off_database(
            llm_memory_summary(
                llm=agent.llm, config=agent.config.llm_config, thread=thread, messages=messages, ended=ended
            )
        )
    except LLMError as exc:
        logger.warning(
            "memory summary of thread %s: LLM unavailable (%s); extractive text used", thread.pk, exc
        )
        return extractive, "extractive"
    if summary is None:
        logger.warning("memory summary of thread %s: unusable LLM reply; extractive text used", thread.pk)
        return extractive, "extractive"
    return summary, "llm"


@shared_task(name="memory.remember_resolution", acks_late=True)
def remember_resolution(thread_id: str) -> str:
    """Write (or refresh) the episodic memory of a resolved thread. Safe to run twice: the second
    write is a near-duplicate of the first and updates it."""
    thread = _first(_RESOLVED_THREAD, Thread, thread_id=thread_id)
    if thread is None:
        return "not resolved"
    messages = _thread_messages(thread)
    # What helped came before the user said so: the bot's answer to the thanks is not the fix (and the
    # job may run before or after that answer is stored).
    resolving = {m.pk for m in messages if m.role == Message.Role.USER and m.thread_event == "RESOLUTION"}
    messages = [m for m in messages if m.reply_to_id not in resolving]
    agent = _agent_of(thread.user)
    config = agent.config.memory_config
    text, how = _memory_text(
        agent,
        thread=thread,
        messages=messages,
        extractive=resolution_memory_text(thread=thread, messages=messages),
        ended=f"resolved: {thread.resolution or 'the user said it is resolved'}",
    )
    memory_remember(
        user=thread.user,
        kind="episodic",
        content=text,
        embedder=agent.embedder,
        source={
            "thread": str(thread.pk),
            "messages": [str(m.pk) for m in messages[-10:]],
            "by": "resolution",
            "summary": how,
        },
        max_per_user=config.max_episodic_per_user,
    )
    if config.global_patterns:
        # What worked, for everyone (opt-in): scrubbed, rewritten in generic terms when online and
        # scrubbed again (memory.sharing); provenance names the thread only.
        lesson, notes = global_lesson(agent=agent, text=text, thread_id=str(thread.pk))
        memory_remember(
            user=None,
            kind="pattern",
            content=lesson,
            embedder=agent.embedder,
            source={"thread": str(thread.pk), "by": "resolution", **notes},
            max_per_user=config.max_episodic_per_user,
            approved=not config.review_global and "held" not in notes,
            agent_id=thread.user.agent_id,
        )
    return "remembered"


@shared_task(name="memory.remember_session", acks_late=True)
def remember_session(session_id: str) -> str:
    """When a session ends, remember its unresolved threads that had a real exchange: the problem,
    what was tried, and that it was left unresolved (resolved threads were remembered on
    resolution). Safe to run twice, and queued both when the user comes back after expiry and by
    the periodic sweep: a repeated write updates the same memory."""
    session = ChatSession.objects.select_related("user", "user__agent").filter(pk=session_id).first()
    if session is None:
        return "missing"
    if session.status == ChatSession.Status.ACTIVE and session.expires_at > timezone.now():
        return "not ended"
    agent = _agent_of(session.user)
    config = agent.config.memory_config
    if not config.enabled:
        return "memory disabled"
    threads = (
        Thread.objects.filter(messages__session=session)
        .exclude(status=Thread.Status.RESOLVED)
        .distinct()
        .order_by("opened_at")
    )
    written = 0
    for thread in threads:
        messages = _thread_messages(thread)
        if not had_real_exchange(messages):
            continue
        text, how = _memory_text(
            agent,
            thread=thread,
            messages=messages,
            extractive=session_memory_text(thread=thread, messages=messages),
            ended="unresolved when the session ended",
        )
        memory_remember(
            user=session.user,
            kind="episodic",
            content=text,
            embedder=agent.embedder,
            source={
                "session": str(session.pk),
                "thread": str(thread.pk),
                "messages": [str(m.pk) for m in messages[-10:]],
                "by": "session end",
                "summary": how,
            },
            max_per_user=config.max_episodic_per_user,
        )
        written += 1
    return f"remembered {written}"


@shared_task(name="memory.sweep_ended_sessions")
def sweep_ended_sessions() -> int:
    """Queue ``remember_session`` for sessions that ended recently, including those whose user never
    came back (nothing else would notice them). Run by Celery beat every ``SWEEP_EVERY``."""
    now = timezone.now()
    since = now - SWEEP_WINDOW
    ended = ChatSession.objects.filter(
        Q(expires_at__lte=now, expires_at__gt=since) | Q(ended_at__lte=now, ended_at__gt=since)
    ).values_list("pk", flat=True)
    count = 0
    for session_id in ended:
        remember_session.delay(str(session_id))
        count += 1
    return count


@shared_task(name="memory.remember_preference", acks_late=True)
def remember_preference(message_id: str) -> str:
    """Remember a preference the user stated ("email me, don't call"), in their own words."""
    message = _first(_USER_MESSAGE, Message, message_id=message_id)
    if message is None:
        return "missing"
    statement = preference_statement(message.content)
    if statement is None:
        return "no preference"
    agent = _agent_of(message.user)
    memory_remember(
        user=message.user,
        kind="preference",
        content=statement,
        embedder=agent.embedder,
        source={"message": str(message.pk), "by": "user statement"},
        max_per_user=agent.config.memory_config.max_episodic_per_user,
        vector=_message_vector(agent, message=message, text=statement),
    )
    return "remembered"


def _message_vector(agent: Any, *, message: Message, text: str) -> Any:
    """The vector the turn computed for ``message`` when the statement is the whole message and the
    turn ran in this process with this agent's embedder (``agentflow.jobs.handed_over``), else None
    (``memory_remember`` embeds it): the same vector either way, without embedding the text twice."""
    known = handed_over("message_vector")
    if known is None:
        return None
    embedder, message_id, content, vector = known
    if embedder is not agent.embedder or message_id != str(message.pk) or content != text:
        return None
    return vector
