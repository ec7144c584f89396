"""The intent categories an agent classifies against: the database, read on every turn.

The database is the one source of truth at run time. Categories defined in code are written to it
when the agent is built (``intent_categories_sync``); ops staff edit them in the admin. Each turn a
cheap fingerprint query (how many categories, when one last changed) tells whether the cached
classifier is stale; if it is, the classifier is rebuilt, so an admin edit reaches every web and
worker process on its next message, with no restart.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from django.db.models import Count, Max, OuterRef, Subquery

from agentflow.embeddings import Embedder
from agentflow.types import IntentCategory as Spec

from .classifier import IntentClassifier
from .models import IntentCategory
from .selectors import intent_categories_active


def categories_fingerprint(*, agent_id: int) -> tuple[Any, ...]:
    return tuple(
        IntentCategory.objects.filter(agent_id=agent_id)
        .aggregate(n=Count("id"), changed=Max("updated_at"))
        .values()
    )


def fingerprint_annotations(*, agent_ref: str) -> dict[str, Any]:
    """The fingerprint as two scalar subqueries, for a query that reads a row with an agent id
    (``agent_ref``, an ``OuterRef`` path): the turn reads it with its message, in the same statement.

    ``fingerprint_of`` turns the annotated row's values into what ``categories_fingerprint`` returns.
    """
    rows = IntentCategory.objects.filter(agent_id=OuterRef(agent_ref)).order_by().values("agent_id")
    return {
        "categories_n": Subquery(rows.annotate(n=Count("id")).values("n")[:1]),
        "categories_changed": Subquery(rows.annotate(changed=Max("updated_at")).values("changed")[:1]),
    }


def fingerprint_of(row: Any) -> tuple[Any, ...]:
    """The fingerprint read through ``fingerprint_annotations`` (no categories: no group, NULL)."""
    return (row.categories_n or 0, row.categories_changed)


class _CachingEmbedder(Embedder):
    """Remembers phrase vectors, so a rebuild after an edit embeds only what changed."""

    def __init__(self, inner: Embedder, limit: int = 20_000) -> None:
        self.inner, self.dimensions, self.model_id = inner, inner.dimensions, inner.model_id
        self._vectors: dict[str, np.ndarray] = {}
        self._limit = limit

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        missing = [t for t in dict.fromkeys(texts) if t not in self._vectors]
        if missing:
            if len(self._vectors) + len(missing) > self._limit:
                self._vectors.clear()
            self._vectors.update(zip(missing, self.inner.embed(missing), strict=True))
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        return np.stack([self._vectors[t] for t in texts])


@dataclass(frozen=True)
class IntentSnapshot:
    categories: tuple[Spec, ...]
    classifier: IntentClassifier
    by_name: dict[str, Spec] = field(default_factory=dict)


class IntentStore:
    """Per-agent cache of the active categories and their classifier, refreshed when they change."""

    def __init__(self, embedder: Embedder, *, agent_id: int) -> None:
        self.agent_id = agent_id
        self._embedder = _CachingEmbedder(embedder)
        self._lock = threading.Lock()
        self._fingerprint: tuple[Any, ...] | None = None
        self._snapshot: IntentSnapshot | None = None

    def current(self, *, fingerprint: tuple[Any, ...] | None = None) -> IntentSnapshot:
        """The categories and classifier as of ``fingerprint`` (read now when not given)."""
        if fingerprint is None:
            fingerprint = categories_fingerprint(agent_id=self.agent_id)
        with self._lock:
            if self._snapshot is None or fingerprint != self._fingerprint:
                categories = tuple(intent_categories_active(agent_id=self.agent_id))
                self._snapshot = IntentSnapshot(
                    categories,
                    IntentClassifier.build(categories, self._embedder),
                    {c.name: c for c in categories},
                )
                self._fingerprint = fingerprint
            return self._snapshot
