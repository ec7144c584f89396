"""Memories: what the agent learned, per user (episodic) or for everyone (global)."""

from __future__ import annotations

import uuid

from django.db import models
from pgvector.django import HnswIndex

from agentflow.vectors import VectorField
from conversations.models import EMBEDDING_DIMENSIONS, EndUser


class Memory(models.Model):
    """A remembered fact, preference or resolution, with its embedding for similarity search.

    ``user`` is ``None`` for global memories, shared by all users of ``agent`` (and no other agent).
    """

    class Kind(models.TextChoices):
        EPISODIC = "episodic"  # what happened in a resolved thread
        PREFERENCE = "preference"  # "email me, don't call"
        FACT = "fact"
        PATTERN = "pattern"  # a global resolution pattern

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    agent = models.ForeignKey("conversations.Agent", on_delete=models.CASCADE, related_name="memories")
    # No index of its own: the (user, kind) index below starts with it.
    user = models.ForeignKey(
        EndUser, on_delete=models.CASCADE, null=True, blank=True, related_name="memories", db_index=False
    )
    kind = models.CharField(max_length=16, choices=Kind.choices)
    content = models.TextField()
    embedding = VectorField(dimensions=EMBEDDING_DIMENSIONS)
    embedding_model = models.CharField(max_length=100)
    source = models.JSONField(
        default=dict, blank=True, help_text="Provenance: thread, messages, who wrote it."
    )
    approved = models.BooleanField(
        default=True,
        help_text="Global memories wait for staff review when memory_config.review_global is on.",
    )
    use_count = models.PositiveIntegerField(default=0)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-updated_at"]
        verbose_name_plural = "memories"
        indexes = [
            # Global memories only: a user's own memories (at most max_episodic_per_user of them) are
            # scanned exactly through the (user, kind) index, so per-user filtering never loses recall.
            HnswIndex(
                name="memory_global_embedding_hnsw",
                fields=["embedding"],
                m=16,
                ef_construction=64,
                opclasses=["vector_cosine_ops"],
                condition=models.Q(user__isnull=True),
            ),
            # The approved global vectors, for memory_search's exact scan (an index-only scan).
            models.Index(
                fields=["agent", "id"],
                include=["embedding"],
                condition=models.Q(user__isnull=True, approved=True),
                name="memory_global_vectors",
            ),
            models.Index(fields=["user", "kind"]),
        ]

    def __str__(self) -> str:
        return self.content[:80]
