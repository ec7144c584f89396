"""Writing memories: a resolved thread becomes an episodic memory (in a Celery worker), de-duplicated
without deleting, evicted least useful first, and received by a later session of the same user."""

from __future__ import annotations

import asyncio

import pytest
from django.utils import timezone

from agentflow import AgentFrameworkBuilder
from agentflow.embeddings import get_embedder
from conversations.models import ChatSession, EndUser, Thread
from memory.models import Memory
from memory.services import memory_remember
from memory.tasks import remember_resolution

LOGIN = "Problem: My login is broken. What helped: Reset the password from Settings. Outcome: it works."
LOGIN_AGAIN = "Problem: My login is broken. What helped: Reset the password from the Settings page. Outcome: works."
BILLING = "Problem: I was charged twice. What helped: A refund was issued. Outcome: refunded."


def _remember(user: EndUser, content: str, *, keep: int = 100, thread: str = "t1") -> tuple[Memory, bool]:
    return memory_remember(
        user=user, kind="episodic", content=content, embedder=get_embedder(), source={"thread": thread},
        max_per_user=keep,
    )


@pytest.mark.django_db
def test_a_near_duplicate_updates_the_memory_and_keeps_both_sources() -> None:
    user = EndUser.objects.create(external_id="alice")
    first, created = _remember(user, LOGIN, thread="t1")

    second, again = _remember(user, LOGIN_AGAIN, thread="t2")

    assert (created, again, second.pk) == (True, False, first.pk)
    assert Memory.objects.filter(user=user).count() == 1
    second.refresh_from_db()
    assert second.content == LOGIN_AGAIN
    assert second.source == {"thread": "t2", "merged": [{"thread": "t1"}]}


@pytest.mark.django_db
def test_different_memories_are_kept_apart_and_per_user() -> None:
    alice = EndUser.objects.create(external_id="alice")
    bob = EndUser.objects.create(external_id="bob")
    _remember(alice, LOGIN)
    _remember(alice, BILLING)
    _, created_for_bob = _remember(bob, LOGIN)

    assert created_for_bob is True  # Bob's memory is never merged into Alice's
    assert Memory.objects.filter(user=alice).count() == 2
    assert Memory.objects.filter(user=bob).count() == 1


@pytest.mark.django_db
def test_eviction_drops_the_least_useful_then_the_oldest() -> None:
    alice = EndUser.objects.create(external_id="alice")
    bob = EndUser.objects.create(external_id="bob")
    _remember(bob, BILLING, keep=1)
    topics = ["password reset", "invoice download", "S3 bucket region", "API rate limits", "team invitations"]
    made = [_remember(alice, f"Problem: {t}. What helped: the docs on {t}. Outcome: solved.", keep=3)[0] for t in topics[:3]]
    Memory.objects.filter(pk=made[0].pk).update(use_count=5, last_used_at=timezone.now())  # the oldest, but useful

    for topic in topics[3:]:
        _remember(alice, f"Problem: {topic}. What helped: the docs on {topic}. Outcome: solved.", keep=3)

    kept = set(Memory.objects.filter(user=alice).values_list("content", flat=True))
    assert len(kept) == 3
    assert made[0].content in kept  # used, so kept although oldest
    assert made[1].content not in kept and made[2].content not in kept
    assert Memory.objects.filter(user=bob).count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.integration
async def test_a_resolved_thread_is_remembered_and_a_later_session_receives_it(celery_worker) -> None:
    agent = await (
        AgentFrameworkBuilder()
        .with_intent_categories([])
        .with_config({"memory_config": {"similarity_threshold": 0.3}})
        .build(None)
    )
    opened = await agent.process_message(user_id="mem", message="My login is broken, it says invalid password")
    await agent.record_message(user_id="mem", content="Reset your password from Settings, then sign in again.")
    resolved = await agent.process_message(user_id="mem", message="Thanks, that fixed the login!")
    assert (resolved["thread_event"], resolved["thread_id"]) == ("RESOLUTION", opened["thread_id"])

    for _ in range(100):  # the worker writes it off the hot path
        memory = await Memory.objects.filter(user__external_id="mem").afirst()
        if memory is not None:
            break
        await asyncio.sleep(0.1)
    assert memory is not None
    assert memory.kind == "episodic"
    assert memory.content.startswith("Problem: My login is broken, it says invalid password What helped:")
    assert "Outcome: Thanks, that fixed the login!" in memory.content
    assert memory.source["thread"] == opened["thread_id"]

    await ChatSession.objects.filter(user__external_id="mem").aupdate(expires_at=timezone.now())
    later = await agent.process_message(user_id="mem", message="My login is broken again, invalid password")

    assert later["session_id"] != opened["session_id"]
    assert [m["id"] for m in later["memories_used"]] == [str(memory.pk)]
    assert (await Memory.objects.aget(pk=memory.pk)).use_count == 1


@pytest.mark.django_db
def test_remember_resolution_is_idempotent_and_ignores_open_threads() -> None:
    from agentflow.pipeline import accept, place  # the thread step alone, to build a resolved thread

    agent = AgentFrameworkBuilder().with_intent_categories([]).build_sync(None)
    first = place(agent, message_id=accept(agent, user_id="idem", message="My login is broken")[0].pk)
    assert remember_resolution(first["thread_id"]) == "not resolved"
    Thread.objects.filter(pk=first["thread_id"]).update(status="resolved", resolution="Thanks, fixed")

    assert remember_resolution(first["thread_id"]) == "remembered"
    assert remember_resolution(first["thread_id"]) == "remembered"
    assert Memory.objects.filter(user__external_id="idem").count() == 1
