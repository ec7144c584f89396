"""Writes of memories."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from django.db import connection, transaction
from django.db.models import F, QuerySet
from django.utils import timezone

from agentflow.embeddings import Embedder
from agentflow.prepared import Increment, PreparedQuery
from agentflow.vectors import CosineDistance
from conversations.models import EndUser

from .models import Memory


def _agent_id(user: EndUser | None, agent_id: int | None) -> int:
    if user is not None:
        return user.agent_id
    if agent_id is None:
        raise ValueError("a global memory needs its agent (agent_id)")
    return agent_id


def memory_add(
    *,
    user: EndUser | None,
    kind: str,
    content: str,
    embedder: Embedder,
    source: dict[str, Any] | None = None,
    agent_id: int | None = None,
) -> Memory:
    """Store a memory as given (staff additions). ``user=None`` is global to ``agent_id``'s users."""
    content = content.strip()
    if not content:
        raise ValueError("a memory needs content")
    if kind not in Memory.Kind.values:
        raise ValueError(f"unknown memory kind {kind!r}; expected one of {Memory.Kind.values}")
    return Memory.objects.create(
        agent_id=_agent_id(user, agent_id),
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


def memories_use_writes(*, memory_ids: Sequence[str], now: datetime) -> list[Increment]:
    """``memories_mark_used`` as writes of the caller's statement (``prepared.write_together``): a
    turn counts the memories it used in its finish's one statement, not in one of its own (none when
    it used none). A memory deleted meanwhile is skipped."""
    if not memory_ids:
        return []
    return [Increment(Memory, memory_ids, field="use_count", values={"last_used_at": now})]


DUPLICATE_SIMILARITY = 0.90  # a new memory this close to one of the same user and kind updates it
# Earlier sources a memory keeps in ``source["merged"]`` (oldest first); older ones are counted in
# ``source["merged_dropped"]``, so a memory refreshed at every similar resolution stays small.
MERGED_KEPT = 20
EVICTABLE = (Memory.Kind.EPISODIC, Memory.Kind.PREFERENCE, Memory.Kind.FACT)


def _merged_source(old: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """``new`` with ``old`` (less its own history) appended to the earlier sources; the oldest past
    ``MERGED_KEPT`` are dropped and counted."""
    history = [
        *old.get("merged", []),
        {k: v for k, v in old.items() if k not in ("merged", "merged_dropped")},
    ]
    dropped = int(old.get("merged_dropped", 0)) + max(0, len(history) - MERGED_KEPT)
    merged: dict[str, Any] = {**new, "merged": history[-MERGED_KEPT:]}
    if dropped:
        merged["merged_dropped"] = dropped
    return merged


def memory_remember(
    *,
    user: EndUser | None,
    kind: str,
    content: str,
    embedder: Embedder,
    source: dict[str, Any],
    max_per_user: int,
    approved: bool = True,
    agent_id: int | None = None,
    vector: Any = None,
) -> tuple[Memory, bool]:
    """Store what was learned about a user; a near-duplicate updates the existing memory instead.

    De-duplication never deletes: the closest memory of the same user and kind (cosine similarity
    at least ``DUPLICATE_SIMILARITY``) takes the new content and embedding, and its provenance keeps
    both sources. Past ``max_per_user`` the least useful, then oldest, memories of the user go
    (``memory_evict``). ``user=None`` writes a global memory of agent ``agent_id`` (not evicted;
    ``approved`` False puts it in the admin's review queue, and takes an updated one back there).
    ``vector``: ``embedder.embed_one(content)`` when the caller already has it (else computed here).

    Returns:
        ``(memory, created)``.
    """
    content = content.strip()
    if not content:
        raise ValueError("a memory needs content")
    owner = _agent_id(user, agent_id)
    if vector is None:
        vector = embedder.embed_one(content)
    with transaction.atomic():
        with connection.cursor() as cursor:  # one writer per user (or agent): two cannot both insert
            cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", [0x4D45, user.pk if user else -owner])
        if user is None:
            found = _NEAREST.run(shape={"global_": True}, agent_id=owner, kind=kind, vector=vector)
        else:
            found = _NEAREST.run(
                shape={"global_": False}, agent_id=owner, user_id=user.pk, kind=kind, vector=vector
            )
        nearest = found[0] if found else None
        if nearest is not None and 1.0 - float(nearest.distance) >= DUPLICATE_SIMILARITY:
            nearest.source = _merged_source(nearest.source, source)
            nearest.content, nearest.embedding, nearest.embedding_model = content, vector, embedder.model_id
            # New text for a global memory needs the same review as a new memory: back to the queue.
            nearest.approved = nearest.approved and approved
            nearest.save(
                update_fields=["content", "embedding", "embedding_model", "source", "approved", "updated_at"]
            )
            return nearest, False
        memory = Memory.objects.create(
            agent_id=owner,
            user=user,
            kind=kind,
            content=content,
            embedding=vector,
            embedding_model=embedder.model_id,
            source=source,
            approved=approved,
        )
        if user is not None:
            memory_evict(user=user, keep=max_per_user)
    return memory, True


def _nearest(
    *, global_: bool, agent_id: int, kind: str, vector: Any, user_id: int | None = None
) -> QuerySet[Memory]:
    """The memory of ``user_id`` (or the agent's global one, ``global_``) and ``kind`` closest to ``vector``."""
    mine = Memory.objects.filter(agent_id=agent_id, kind=kind)
    mine = mine.filter(user__isnull=True) if global_ else mine.filter(user_id=user_id)
    return mine.annotate(distance=CosineDistance("embedding", vector)).order_by("distance")[:1]


# Read by every memory write (the memory jobs of the turns): compiled once per connection.
_NEAREST = PreparedQuery(_nearest)


def memory_evict(*, user: EndUser, keep: int) -> int:
    """Keep the user's ``keep`` most useful memories: the least used go first, then the oldest."""
    doomed = list(
        Memory.objects.filter(user=user, kind__in=EVICTABLE)
        .order_by("-use_count", F("last_used_at").desc(nulls_last=True), "-created_at")
        .values_list("pk", flat=True)[keep:]
    )
    if doomed:
        Memory.objects.filter(pk__in=doomed).delete()
    return len(doomed)


def memories_to_reembed(*, model_id: str, everything: bool = False) -> Any:
    """Memories whose vectors come from another model than ``model_id`` (all of them with ``everything``)."""
    queryset = Memory.objects.all()
    return queryset if everything else queryset.exclude(embedding_model=model_id)


def memories_reembed(
    *,
    embedder: Embedder,
    batch_size: int,
    everything: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> int:
    """Recompute the embeddings of memories made with another model, a batch per transaction.

    Resumable: each batch records the new ``embedding_model``, so an interrupted run, run again,
    starts where it stopped. ``everything`` re-embeds every memory (in primary-key order; a re-run
    starts over). Rows being re-embedded are locked (``SKIP LOCKED``: two runs share the work);
    only the embedding columns are written, so a concurrent content edit is not lost.

    Returns:
        How many memories were re-embedded.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1; got {batch_size}")
    done = 0
    after = None
    while True:
        with transaction.atomic():
            queryset = memories_to_reembed(model_id=embedder.model_id, everything=everything).order_by("pk")
            if after is not None:
                queryset = queryset.filter(pk__gt=after)
            batch = list(queryset.select_for_update(skip_locked=True).only("pk", "content")[:batch_size])
            if not batch:
                return done
            vectors = embedder.embed([memory.content for memory in batch])
            for memory, vector in zip(batch, vectors, strict=True):
                memory.embedding, memory.embedding_model = vector, embedder.model_id
            Memory.objects.bulk_update(batch, ["embedding", "embedding_model"])
        after = batch[-1].pk
        done += len(batch)
        if on_batch is not None:
            on_batch(len(batch))
