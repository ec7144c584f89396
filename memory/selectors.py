"""Reads of memories: similarity search with pgvector."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from django.db.models import Q
from django.utils import timezone
from pgvector.django import CosineDistance

from conversations.models import EndUser

from .models import Memory


def rank_score(*, similarity: float, use_count: int, age_days: int) -> float:
    """Similarity first; a memory that helped before (used up to 10 times: +10 %) and a recent one
    (up to +10 %, fading over about three months) rank ahead of an equally similar one."""
    usefulness = 1.0 + 0.1 * min(use_count, 10) / 10
    recency = 0.9 + 0.1 * math.exp(-max(age_days, 0) / 90)
    return similarity * usefulness * recency


def memory_search(
    *, user: EndUser, embedding: np.ndarray, limit: int, similarity_threshold: float
) -> list[dict[str, Any]]:
    """The user's own and the approved global memories most similar to ``embedding``, best first,
    weighted by usefulness and recency (``rank_score``).

    pgvector 0.8's iterative index scan (``hnsw.iterative_scan``, set on every connection in the
    database settings) keeps the HNSW index from returning too few rows when the per-user filter
    discards most of its candidates.
    """
    max_distance = 1.0 - similarity_threshold
    now = timezone.now()
    rows = list(
        Memory.objects.filter(Q(user=user) | Q(user__isnull=True, approved=True))
        .annotate(distance=CosineDistance("embedding", embedding))
        .filter(distance__lte=max_distance)
        .order_by("distance")
        .values("id", "kind", "content", "user_id", "distance", "use_count", "updated_at")[: limit * 3]
    )
    for row in rows:
        row["similarity"] = 1.0 - float(row["distance"])
        row["score"] = rank_score(
            similarity=row["similarity"], use_count=row["use_count"], age_days=(now - row["updated_at"]).days
        )
    rows = sorted(rows, key=lambda r: r["score"], reverse=True)[:limit]
    return [
        {
            "id": str(row["id"]),
            "kind": row["kind"],
            "content": row["content"],
            "scope": "user" if row["user_id"] else "global",
            "similarity": round(row["similarity"], 4),
            "score": round(row["score"], 4),
        }
        for row in rows
    ]
