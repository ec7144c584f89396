"""Reads of memories: similarity search with pgvector."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from django.db import connection, transaction
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


GLOBAL_EF_SEARCH = 100  # HNSW candidate list for the global memories (pgvector's default is 40)


def memory_search(
    *, user: EndUser, embedding: np.ndarray, limit: int, similarity_threshold: float
) -> list[dict[str, Any]]:
    """The user's own and the approved global memories most similar to ``embedding``, best first,
    weighted by usefulness and recency (``rank_score``).

    One query, two parts (``UNION ALL``), each ordered by distance:

    - the user's own memories, scanned exactly through the ``(user, kind)`` btree index: a user has
      at most ``max_episodic_per_user`` of them, so this is cheap and never misses one (a filtered
      HNSW scan over every user's rows can return too few);
    - the approved global memories through the partial HNSW index (``WHERE user_id IS NULL``);
      pgvector 0.8's iterative scan (``hnsw.iterative_scan``, set on every connection in the
      database settings) keeps scanning when the ``approved`` filter discards candidates.

    The similarity threshold is applied to the candidates in Python: a distance filter inside an
    HNSW scan would make the iterative scan walk the whole index when few rows pass.
    """
    max_distance = 1.0 - similarity_threshold
    now = timezone.now()
    fields = ("id", "kind", "content", "user_id", "distance", "use_count", "updated_at")
    pool = limit * 3

    def nearest(queryset: Any) -> Any:
        return queryset.annotate(distance=CosineDistance("embedding", embedding)).order_by("distance").values(*fields)

    own = nearest(Memory.objects.filter(user=user))[:pool]
    shared = nearest(Memory.objects.filter(user__isnull=True, approved=True))[:pool]
    with transaction.atomic(), connection.cursor() as cursor:
        # More HNSW candidates than pgvector's default 40: recall@10 >= 0.95 (bench/memory_bench.py).
        cursor.execute("SELECT set_config('hnsw.ef_search', %s, true)", [str(max(GLOBAL_EF_SEARCH, pool))])
        candidates = sorted(own.union(shared, all=True), key=lambda r: r["distance"])[:pool]
    rows = [row for row in candidates if row["distance"] <= max_distance]
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
