"""Reads of memories: similarity search with pgvector."""

from __future__ import annotations

from typing import Any

import numpy as np
from django.db.models import Q
from pgvector.django import CosineDistance

from conversations.models import EndUser

from .models import Memory


def memory_search(
    *, user: EndUser, embedding: np.ndarray, limit: int, similarity_threshold: float
) -> list[dict[str, Any]]:
    """The user's own and the global memories most similar to ``embedding``, best first.

    pgvector 0.8's iterative index scan (``hnsw.iterative_scan``, set on every connection in the
    database settings) keeps the HNSW index from returning too few rows when the per-user filter
    discards most of its candidates.
    """
    max_distance = 1.0 - similarity_threshold
    rows = list(
        Memory.objects.filter(Q(user=user) | Q(user__isnull=True, approved=True))
        .annotate(distance=CosineDistance("embedding", embedding))
        .filter(distance__lte=max_distance)
        .order_by("distance")
        .values("id", "kind", "content", "user_id", "distance")[:limit]
    )
    return [
        {
            "id": str(row["id"]),
            "kind": row["kind"],
            "content": row["content"],
            "scope": "user" if row["user_id"] else "global",
            "similarity": round(1.0 - float(row["distance"]), 4),
        }
        for row in rows
    ]
