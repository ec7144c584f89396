"""Writes of memories."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from django.db.models import F
from django.utils import timezone

from agentflow.embeddings import Embedder
from conversations.models import EndUser

from .models import Memory


def memory_add(
    *, user: EndUser | None, kind: str, content: str, embedder: Embedder, source: dict[str, Any] | None = None
) -> Memory:
    content = content.strip()
    if not content:
        raise ValueError("a memory needs content")
    if kind not in Memory.Kind.values:
        raise ValueError(f"unknown memory kind {kind!r}; expected one of {Memory.Kind.values}")
    return Memory.objects.create(
        user=user,
        kind=kind,
        content=content,
        embedding=embedder.embed_one(content),
        embedding_model=embedder.model_id,
        source=source or {},
    )


def memory_embed(*, memory: Memory, embedder: Embedder) -> None:
    """(Re)compute a memory's embedding from its content, e.g. after staff edit it; the caller saves."""
    memory.embedding = embedder.embed_one(memory.content)
    memory.embedding_model = embedder.model_id


def memories_mark_used(*, memory_ids: Sequence[str]) -> None:
    if memory_ids:
        Memory.objects.filter(pk__in=list(memory_ids)).update(
            use_count=F("use_count") + 1, last_used_at=timezone.now()
        )
