"""Reads of memories: similarity search with pgvector."""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np
from django.db import connection, transaction
from django.db.models import Exists, FloatField, OuterRef, Subquery, Value
from django.utils import timezone

from agentflow.prepared import PreparedQuery
from agentflow.vectors import CosineDistance
from conversations.models import EndUser

from .models import Memory


def rank_score(*, similarity: float, use_count: int, age_days: int) -> float:
    """Similarity first; a memory that helped before (used up to 10 times: +10 %) and a recent one
    (up to +10 %, fading over about three months) rank ahead of an equally similar one."""
    usefulness = 1.0 + 0.1 * min(use_count, 10) / 10
    recency = 0.9 + 0.1 * math.exp(-max(age_days, 0) / 90)
    return similarity * usefulness * recency


GLOBAL_EF_SEARCH = 100  # HNSW candidate list for the global memories (pgvector's default is 40)
GLOBAL_EXACT_MAX = 20_000  # up to this many approved global memories, they are scanned exactly
_GLOBAL_COUNT_TTL = 300.0  # seconds a process trusts its count of approved global memories
_global_counts: dict[int, tuple[float, int]] = {}  # agent id -> (when counted, monotonic; count)


def approved_global_count(*, agent_id: int, max_age: float = _GLOBAL_COUNT_TTL) -> int:
    """How many approved global memories an agent has, counted at most every ``max_age`` seconds per
    process (it only chooses the search plan, so a few minutes' staleness is harmless)."""
    counted_at, count = _global_counts.get(agent_id, (-max_age, 0))
    if time.monotonic() - counted_at >= max_age:
        count = Memory.objects.filter(agent_id=agent_id, user__isnull=True, approved=True).count()
        _global_counts[agent_id] = (time.monotonic(), count)
    return count


def memories_exist_annotations(*, user_ref: str, agent_ref: str) -> dict[str, Any]:
    """Annotations saying whether ``memory_search`` can find anything for a row's user: memories of
    their own (``own_memories``), approved global ones of their agent (``shared_memories``). A turn
    reads them with its locked message, in the same statement, and skips the search when both are
    false (a new user, or one nothing was remembered for yet): exact in every process, unlike a
    per-process cache, at the cost of two index probes."""
    return {
        "own_memories": Exists(Memory.objects.filter(user_id=OuterRef(user_ref))),
        "shared_memories": Exists(
            Memory.objects.filter(agent_id=OuterRef(agent_ref), user__isnull=True, approved=True)
        ),
    }


def memory_candidates(
    *, user_id: int, agent_id: int, embedding: np.ndarray, pool: int, exact_globals: bool
) -> Any:
    """The ``UNION ALL`` query of ``memory_search``: up to ``pool`` nearest of the user's own memories
    and of their agent's approved global ones, as ``values()`` rows with ``distance``."""
    fields = ("id", "kind", "content", "user_id", "distance", "use_count", "updated_at")

    def nearest(queryset: Any, *, exact: bool) -> Any:
        distance: Any = CosineDistance("embedding", embedding)
        # "+ 0" hides the ORDER BY from the HNSW index: the rows are found by the btree index, then sorted.
        distance = distance + Value(0.0, output_field=FloatField()) if exact else distance
        return queryset.annotate(distance=distance).order_by("distance").values(*fields)

    own = nearest(Memory.objects.filter(user_id=user_id), exact=True)[:pool]
    approved_global = Memory.objects.filter(agent_id=agent_id, user__isnull=True, approved=True)
    if not exact_globals:
        return own.union(nearest(approved_global, exact=False)[:pool], all=True)
    # The exact scan reads the vectors from the covering index memory_global_vectors (an index-only
    # scan, no heap visits), then fetches the rows of the nearest only.
    nearest_ids = nearest(approved_global, exact=True).values("pk")[:pool]
    shared = approved_global.filter(pk__in=Subquery(nearest_ids)).order_by()
    return own.union(
        shared.annotate(distance=CosineDistance("embedding", embedding)).values(*fields), all=True
    )


# Run on every turn: compiled once per connection and search plan (agentflow.prepared).
_MEMORY_CANDIDATES = PreparedQuery(memory_candidates)


def memory_search(
    *, user: EndUser, embedding: np.ndarray, limit: int, similarity_threshold: float
) -> list[dict[str, Any]]:
    """The user's own and the approved global memories most similar to ``embedding``, best first,
    weighted by usefulness and recency (``rank_score``).

    One query, two parts (``UNION ALL``), each ordered by distance:

    - the user's own memories, scanned exactly through the ``(user, kind)`` btree index: a user has
      at most ``max_episodic_per_user`` of them, so this is cheap and never misses one (a filtered
      HNSW scan over every user's rows can return too few);
    - the approved global memories: scanned exactly while there are at most ``GLOBAL_EXACT_MAX``
      (10,000 take ~6 ms; HNSW misses many neighbours of random-like vectors at that size), else
      through the partial HNSW index (``WHERE user_id IS NULL``) with ``hnsw.ef_search`` =
      ``GLOBAL_EF_SEARCH`` and pgvector 0.8's iterative scan (``hnsw.iterative_scan``, set on every
      connection in the database settings), which keeps scanning when ``approved`` discards rows.

    The similarity threshold is applied to the candidates in Python: a distance filter inside an
    HNSW scan would make the iterative scan walk the whole index when few rows pass.
    """
    max_distance = 1.0 - similarity_threshold
    now = timezone.now()
    pool = limit * 3
    exact_globals = approved_global_count(agent_id=user.agent_id) <= GLOBAL_EXACT_MAX

    def query() -> list[dict[str, Any]]:
        return _MEMORY_CANDIDATES.run(
            shape={"pool": pool, "exact_globals": exact_globals},
            user_id=user.pk,
            agent_id=user.agent_id,
            embedding=np.asarray(embedding, dtype=np.float32),
        )

    if exact_globals:
        candidates = sorted(query(), key=lambda r: r["distance"])[:pool]
    else:
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                "SELECT set_config('hnsw.ef_search', %s, true)", [str(max(GLOBAL_EF_SEARCH, pool))]
            )
            candidates = sorted(query(), key=lambda r: r["distance"])[:pool]
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
