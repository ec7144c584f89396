"""Writing memories: a resolved thread becomes an episodic memory (in a Celery worker), de-duplicated
without deleting, evicted least useful first, and received by a later session of the same user."""

from __future__ import annotations

import asyncio

import pytest
from django.utils import timezone

from agentflow import AgentFrameworkBuilder
from agentflow.embeddings import get_embedder
from agentflow.registry import clear_agent_cache
from conversations.models import ChatSession, EndUser, Message, Thread
from memory.models import Memory
from memory.services import memory_remember
from memory.tasks import remember_resolution
from tests.conversations.factories import MessageFactory, ThreadFactory, default_agent_row

LOGIN = "Problem: My login is broken. What helped: Reset the password from Settings. Outcome: it works."
LOGIN_AGAIN = (
    "Problem: My login is broken. What helped: Reset the password from the Settings page. Outcome: works."
)
BILLING = "Problem: I was charged twice. What helped: A refund was issued. Outcome: refunded."


def share_globally(settings, *, review: bool) -> None:
    """The workers' agent opts in to global lessons (off by default), with or without staff review."""
    settings.AGENTFLOW = {
        **settings.AGENTFLOW,
        "CONFIG": {"memory_config": {"global_patterns": True, "review_global": review}},
    }


def _remember(user: EndUser, content: str, *, keep: int = 100, thread: str = "t1") -> tuple[Memory, bool]:
    return memory_remember(
        user=user,
        kind="episodic",
        content=content,
        embedder=get_embedder(),
        source={"thread": thread},
        max_per_user=keep,
    )


@pytest.mark.django_db
def test_a_near_duplicate_updates_the_memory_and_keeps_both_sources() -> None:
    user = EndUser.objects.create(agent=default_agent_row(), external_id="alice")
    first, created = _remember(user, LOGIN, thread="t1")

    second, again = _remember(user, LOGIN_AGAIN, thread="t2")

    assert (created, again, second.pk) == (True, False, first.pk)
    assert Memory.objects.filter(user=user).count() == 1
    second.refresh_from_db()
    assert second.content == LOGIN_AGAIN
    assert second.source == {"thread": "t2", "merged": [{"thread": "t1"}]}


@pytest.mark.django_db
def test_a_memory_refreshed_again_and_again_keeps_its_last_sources_and_counts_the_rest() -> None:
    from memory.admin import provenance_html
    from memory.services import MERGED_KEPT

    user = EndUser.objects.create(agent=default_agent_row(), external_id="alice")
    refreshes = MERGED_KEPT + 5
    for i in range(refreshes + 1):  # one write, then a near-duplicate at every later resolution
        memory, created = _remember(user, LOGIN if i % 2 == 0 else LOGIN_AGAIN, thread=f"t{i}")
        assert created is (i == 0)

    memory.refresh_from_db()
    assert Memory.objects.filter(user=user).count() == 1
    assert memory.source["thread"] == f"t{refreshes}"
    assert memory.source["merged"] == [{"thread": f"t{i}"} for i in range(5, refreshes)]
    assert memory.source["merged_dropped"] == 5
    shown = str(provenance_html(memory.source))
    assert shown.count("<li>") == MERGED_KEPT + 1 and "<li>and 5 earlier</li>" in shown


@pytest.mark.django_db
def test_different_memories_are_kept_apart_and_per_user() -> None:
    alice = EndUser.objects.create(agent=default_agent_row(), external_id="alice")
    bob = EndUser.objects.create(agent=default_agent_row(), external_id="bob")
    _remember(alice, LOGIN)
    _remember(alice, BILLING)
    _, created_for_bob = _remember(bob, LOGIN)

    assert created_for_bob is True  # Bob's memory is never merged into Alice's
    assert Memory.objects.filter(user=alice).count() == 2
    assert Memory.objects.filter(user=bob).count() == 1


@pytest.mark.django_db
def test_eviction_drops_the_least_useful_then_the_oldest() -> None:
    alice = EndUser.objects.create(agent=default_agent_row(), external_id="alice")
    bob = EndUser.objects.create(agent=default_agent_row(), external_id="bob")
    _remember(bob, BILLING, keep=1)
    topics = ["password reset", "invoice download", "S3 bucket region", "API rate limits", "team invitations"]
    made = [
        _remember(alice, f"Problem: {t}. What helped: the docs on {t}. Outcome: solved.", keep=3)[0]
        for t in topics[:3]
    ]
    Memory.objects.filter(pk=made[0].pk).update(
        use_count=5, last_used_at=timezone.now()
    )  # the oldest, but useful

    for topic in topics[3:]:
        _remember(alice, f"Problem: {topic}. What helped: the docs on {topic}. Outcome: solved.", keep=3)

    kept = set(Memory.objects.filter(user=alice).values_list("content", flat=True))
    assert len(kept) == 3
    assert made[0].content in kept  # used, so kept although oldest
    assert made[1].content not in kept and made[2].content not in kept
    assert Memory.objects.filter(user=bob).count() == 1


@pytest.mark.django_db(transaction=True)
@pytest.mark.integration
async def test_a_resolved_thread_is_remembered_and_a_later_session_receives_it(
    celery_worker, settings
) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "BACKGROUND_JOBS": True}
    share_globally(settings, review=False)
    agent = await (
        AgentFrameworkBuilder()
        .with_intent_categories([])
        .with_config(
            {
                "memory_config": {
                    "similarity_threshold": 0.3,
                    "global_patterns": True,
                    "review_global": False,
                },
                # offline replies must answer every message here, not hand the thread to a human
                "fallback_config": {"escalate": False},
            }
        )
        .build(None)
    )
    opened = await agent.process_message(
        user_id="mem", message="My login is broken, it says invalid password"
    )
    await agent.record_message(
        user_id="mem", content="Reset your password from Settings, then sign in again."
    )
    resolved = await agent.process_message(user_id="mem", message="Thanks, that fixed the login!")
    assert (resolved["thread_event"], resolved["thread_id"]) == ("RESOLUTION", opened["thread_id"])

    for _ in range(100):  # the worker writes both off the hot path: the user's memory and the global pattern
        if await Memory.objects.acount() == 2:
            break
        await asyncio.sleep(0.1)
    memory = await Memory.objects.aget(user__external_id="mem", kind="episodic")
    assert memory.content.startswith("Problem: My login is broken, it says invalid password What helped:")
    assert "Outcome: Thanks, that fixed the login!" in memory.content
    assert memory.source["thread"] == opened["thread_id"]

    await ChatSession.objects.filter(user__external_id="mem").aupdate(expires_at=timezone.now())
    later = await agent.process_message(user_id="mem", message="My login is broken again, invalid password")

    assert later["session_id"] != opened["session_id"]
    used = {m["id"]: m["scope"] for m in later["memories_used"]}
    pattern = await Memory.objects.aget(user__isnull=True, kind="pattern")  # the same lesson, for everyone
    assert used == {str(memory.pk): "user", str(pattern.pk): "global"}
    assert (await Memory.objects.aget(pk=memory.pk)).use_count == 1


@pytest.mark.django_db
def test_remember_resolution_is_idempotent_and_ignores_open_threads() -> None:
    from agentflow.pipeline import accept, place  # the thread step alone, to build a resolved thread

    agent = AgentFrameworkBuilder().with_intent_categories([]).build_sync(None)

    clear_agent_cache()  # the memory tasks resolve the agent as a worker does
    first = place(agent, message_id=accept(agent, user_id="idem", message="My login is broken")[0].pk)
    assert remember_resolution(first["thread_id"]) == "not resolved"
    Thread.objects.filter(pk=first["thread_id"]).update(status="resolved", resolution="Thanks, fixed")

    assert remember_resolution(first["thread_id"]) == "remembered"
    assert remember_resolution(first["thread_id"]) == "remembered"
    assert Memory.objects.filter(user__external_id="idem").count() == 1


def test_personal_data_is_scrubbed_from_shared_text() -> None:
    from memory.scrub import scrub_personal_data

    text = "My name is Ann Lee, order A-1001, account 98765432, mail ann@example.com, call +1 415 555 0100"

    assert scrub_personal_data(text) == (
        "My name is [name], order [id], account [account], mail [email], call [phone]"
    )


@pytest.mark.django_db
def test_a_resolution_also_teaches_everyone_a_scrubbed_pattern(settings) -> None:
    from agentflow.pipeline import accept, place

    share_globally(settings, review=False)
    agent = AgentFrameworkBuilder().with_intent_categories([]).build_sync(None)
    clear_agent_cache()  # the memory tasks resolve the agent as a worker does
    first = place(
        agent, message_id=accept(agent, user_id="ann", message="Order A-1001 never arrived, I'm Ann")[0].pk
    )
    Thread.objects.filter(pk=first["thread_id"]).update(
        status="resolved", resolution="Thanks, ann@example.com got it"
    )

    assert remember_resolution(first["thread_id"]) == "remembered"

    pattern = Memory.objects.get(user__isnull=True)
    assert pattern.kind == "pattern" and pattern.approved is True
    assert (
        "A-1001" not in pattern.content
        and "ann@example.com" not in pattern.content
        and "Ann" not in pattern.content
    )
    assert "[id]" in pattern.content and "[email]" in pattern.content
    assert pattern.source == {"thread": first["thread_id"], "by": "resolution", "privacy": "scrubbed"}
    personal = Memory.objects.get(user__external_id="ann")
    assert "A-1001" in personal.content  # the user's own memory keeps the details


@pytest.mark.django_db
def test_global_memories_under_review_are_not_used_until_approved() -> None:
    from memory.selectors import memory_search

    embedder = get_embedder()
    alice = EndUser.objects.create(agent=default_agent_row(), external_id="alice")
    memory_remember(
        user=None,
        agent_id=alice.agent_id,
        kind="pattern",
        content=LOGIN,
        embedder=embedder,
        source={},
        max_per_user=10,
        approved=False,
    )
    vector = embedder.embed_one("My login is broken")

    assert memory_search(user=alice, embedding=vector, limit=5, similarity_threshold=0.3) == []
    Memory.objects.update(approved=True)
    assert [
        m["scope"] for m in memory_search(user=alice, embedding=vector, limit=5, similarity_threshold=0.3)
    ] == ["global"]


@pytest.mark.django_db
def test_a_stated_preference_is_remembered_in_the_users_words() -> None:
    from agentflow.pipeline import accept, place
    from memory.tasks import remember_preference
    from memory.writing import preference_statement

    assert (
        preference_statement("Hi there. Please email me, don't call. Thanks!")
        == "Please email me, don't call."
    )
    assert preference_statement("My login is broken") is None
    agent = AgentFrameworkBuilder().with_intent_categories([]).build_sync(None)
    clear_agent_cache()  # the memory tasks resolve the agent as a worker does
    message = accept(agent, user_id="pref", message="The app crashes. Please email me, don't call.")[0]
    place(agent, message_id=message.pk)

    assert remember_preference(str(message.pk)) == "remembered"
    memory = Memory.objects.get(user__external_id="pref")
    assert (memory.kind, memory.content) == ("preference", "Please email me, don't call.")


@pytest.mark.django_db
def test_retrieval_prefers_useful_and_recent_memories_at_equal_similarity() -> None:
    from datetime import timedelta

    from memory.selectors import memory_search, rank_score

    embedder = get_embedder()
    alice = EndUser.objects.create(agent=default_agent_row(), external_id="alice")
    vector = embedder.embed_one(LOGIN)
    old = Memory.objects.create(
        agent=default_agent_row(),
        user=alice,
        kind="fact",
        content=LOGIN,
        embedding=vector,
        embedding_model="m",
    )
    useful = Memory.objects.create(
        agent=default_agent_row(),
        user=None,
        kind="pattern",
        content=LOGIN,
        embedding=vector,
        embedding_model="m",
    )
    Memory.objects.filter(pk=old.pk).update(updated_at=timezone.now() - timedelta(days=400))
    Memory.objects.filter(pk=useful.pk).update(use_count=10)

    found = memory_search(user=alice, embedding=vector, limit=2, similarity_threshold=0.5)

    assert [m["id"] for m in found] == [str(useful.pk), str(old.pk)]
    assert found[0]["similarity"] == found[1]["similarity"] == 1.0
    assert found[0]["score"] == round(rank_score(similarity=1.0, use_count=10, age_days=0), 4)
    assert rank_score(similarity=0.8, use_count=0, age_days=0) > rank_score(
        similarity=0.7, use_count=10, age_days=0
    )


@pytest.mark.django_db
def test_notices_are_never_what_helped() -> None:
    from memory.writing import resolution_memory_text

    thread = ThreadFactory(topic="My login is broken")
    thread.resolution = "Thanks, that fixed it"
    MessageFactory(thread=thread, role="assistant", content="Reset it from Settings.", handled_by="llm")
    MessageFactory(
        thread=thread, role="assistant", content="[Offline mode] No AI assistant…", handled_by="offline"
    )
    MessageFactory(
        thread=thread, role="assistant", content="A human will reply here shortly.", handled_by="handoff"
    )
    messages = list(Message.objects.filter(thread=thread).order_by("created_at"))

    assert resolution_memory_text(thread=thread, messages=messages) == (
        "Problem: My login is broken What helped: Reset it from Settings. Outcome: Thanks, that fixed it"
    )
