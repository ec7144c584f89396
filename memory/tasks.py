"""Celery tasks that write memories, off the turn's hot path."""

from __future__ import annotations

from celery import shared_task

from agentflow.defaults import get_agent
from conversations.models import Message, Thread

from .scrub import scrub_personal_data
from .services import memory_remember
from .writing import preference_statement, resolution_memory_text


@shared_task(name="memory.remember_resolution", acks_late=True)
def remember_resolution(thread_id: str) -> str:
    """Write (or refresh) the episodic memory of a resolved thread. Safe to run twice: the second
    write is a near-duplicate of the first and updates it."""
    thread = Thread.objects.select_related("user").filter(pk=thread_id, status=Thread.Status.RESOLVED).first()
    if thread is None:
        return "not resolved"
    messages = list(Message.objects.filter(thread=thread).exclude(role=Message.Role.SYSTEM).order_by("created_at"))
    agent = get_agent()
    config = agent.config.memory_config
    text = resolution_memory_text(thread=thread, messages=messages)
    memory_remember(
        user=thread.user,
        kind="episodic",
        content=text,
        embedder=agent.embedder,
        source={"thread": str(thread.pk), "messages": [str(m.pk) for m in messages[-10:]], "by": "resolution"},
        max_per_user=config.max_episodic_per_user,
    )
    if config.global_patterns:
        # What worked, for everyone: scrubbed of personal data; provenance names the thread only.
        memory_remember(
            user=None,
            kind="pattern",
            content=scrub_personal_data(text),
            embedder=agent.embedder,
            source={"thread": str(thread.pk), "by": "resolution"},
            max_per_user=config.max_episodic_per_user,
            approved=not config.review_global,
        )
    return "remembered"


@shared_task(name="memory.remember_preference", acks_late=True)
def remember_preference(message_id: str) -> str:
    """Remember a preference the user stated ("email me, don't call"), in their own words."""
    message = Message.objects.select_related("user").filter(pk=message_id, role=Message.Role.USER).first()
    if message is None:
        return "missing"
    statement = preference_statement(message.content)
    if statement is None:
        return "no preference"
    agent = get_agent()
    memory_remember(
        user=message.user,
        kind="preference",
        content=statement,
        embedder=agent.embedder,
        source={"message": str(message.pk), "by": "user statement"},
        max_per_user=agent.config.memory_config.max_episodic_per_user,
    )
    return "remembered"
