"""Celery tasks that write memories, off the turn's hot path."""

from __future__ import annotations

from celery import shared_task

from agentflow.defaults import get_agent
from conversations.models import Message, Thread

from .services import memory_remember
from .writing import resolution_memory_text


@shared_task(name="memory.remember_resolution", acks_late=True)
def remember_resolution(thread_id: str) -> str:
    """Write (or refresh) the episodic memory of a resolved thread. Safe to run twice: the second
    write is a near-duplicate of the first and updates it."""
    thread = Thread.objects.select_related("user").filter(pk=thread_id, status=Thread.Status.RESOLVED).first()
    if thread is None:
        return "not resolved"
    messages = list(Message.objects.filter(thread=thread).exclude(role=Message.Role.SYSTEM).order_by("created_at"))
    agent = get_agent()
    memory_remember(
        user=thread.user,
        kind="episodic",
        content=resolution_memory_text(thread=thread, messages=messages),
        embedder=agent.embedder,
        source={"thread": str(thread.pk), "messages": [str(m.pk) for m in messages[-10:]], "by": "resolution"},
        max_per_user=agent.config.memory_config.max_episodic_per_user,
    )
    return "remembered"
