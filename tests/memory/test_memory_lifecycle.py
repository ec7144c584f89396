"""LLM summaries of resolved threads (with the extractive fallback), memories of ended sessions, the
periodic sweep, per-user recall, re-embedding after a model change, and the admin's provenance."""

from __future__ import annotations

import asyncio
import io
from datetime import timedelta

import numpy as np
import pytest
from django.core.management import CommandError, call_command
from django.db import connection, connections
from django.urls import reverse
from django.utils import timezone

from agentflow import AgentFrameworkBuilder
from agentflow.embeddings import MiniLMEmbedder, get_embedder
from agentflow.testing.fake_anthropic import FakeReply
from conversations.models import ChatSession, EndUser, Message, Thread
from memory.models import Memory
from memory.selectors import memory_search
from memory.services import memories_reembed, memory_add
from memory.tasks import remember_resolution, remember_session, sweep_ended_sessions
from memory.writing import SUMMARY_SYSTEM
from tests.conversations.factories import default_agent_row

from .test_memory_writing import share_globally

SUMMARY = (
    "Problem: login fails with invalid password. What worked: a password reset from Settings. Outcome: fixed."
)


class RenamedEmbedder(MiniLMEmbedder):
    """The same vectors under a new model name: what a model change looks like to the database."""

    model_id = "minilm-renamed-v2"


def _thread(user_id: str = "mem", *, resolved: bool = True, answered: bool = True) -> Thread:
    """A thread with a user message (and an answer), built through the real thread step."""
    from agentflow.pipeline import accept, place

    agent = AgentFrameworkBuilder().with_intent_categories([]).build_sync(None)
    message = accept(agent, user_id=user_id, message="My login is broken, it says invalid password")[0]
    thread = Thread.objects.get(pk=place(agent, message_id=message.pk)["thread_id"])
    from agentflow.registry import clear_agent_cache

    clear_agent_cache()  # the memory tasks below resolve the agent as a worker does (its declared factory)
    if answered:
        Message.objects.create(
            user=thread.user,
            session=thread.session,
            thread=thread,
            role=Message.Role.ASSISTANT,
            content="Reset your password from Settings, then sign in again.",
            status=Message.Status.DONE,
        )
    if resolved:
        Thread.objects.filter(pk=thread.pk).update(
            status="resolved", resolution="Thanks, that fixed the login!"
        )
    thread.refresh_from_db()
    return thread


@pytest.fixture
def fake_llm(fake_llm):
    """Online, and the LLM clients the task opened on this thread's loop are closed afterwards."""
    yield fake_llm
    from agentflow.loops import thread_loop as _thread_loop
    from agentflow.registry import cached_agents

    for agent in cached_agents():
        close = getattr(agent.llm, "aclose", None)
        if close is not None:
            _thread_loop().run_until_complete(close())


def _expire(session: ChatSession, *, ago: timedelta = timedelta(minutes=1)) -> None:
    ChatSession.objects.filter(pk=session.pk).update(
        status=ChatSession.Status.EXPIRED, expires_at=timezone.now() - ago, ended_at=timezone.now() - ago
    )


# --- LLM summary on resolution ---------------------------------------------------------------


@pytest.mark.django_db
def test_online_the_llm_summary_is_remembered(fake_llm) -> None:
    thread = _thread()
    fake_llm.enqueue(FakeReply(text=f"  {SUMMARY}\n"))

    assert remember_resolution(str(thread.pk)) == "remembered"

    memory = Memory.objects.get(user=thread.user)
    assert memory.content == SUMMARY
    assert memory.source["summary"] == "llm" and memory.source["by"] == "resolution"
    request = fake_llm.requests[0]["body"]
    assert request["system"] == SUMMARY_SYSTEM
    prompt = request["messages"][0]["content"]
    assert "How it ended: resolved: Thanks, that fixed the login!" in prompt
    assert "assistant: Reset your password from Settings, then sign in again." in prompt
    assert not Memory.objects.filter(user__isnull=True).exists()  # global lessons are opt-in


@pytest.mark.django_db(transaction=True)
def test_the_summary_job_holds_no_database_connection_while_the_llm_answers(fake_llm, monkeypatch) -> None:
    # A worker thread writing a memory waits seconds for the LLM: it must not keep one of the pool's
    # connections the worker's turns need meanwhile (agentflow.loops.run_off_database).
    import memory.tasks
    from memory import writing

    held: list[bool] = []
    summarize = writing.llm_memory_summary

    async def watched(**kwargs):
        held.append(wrapper.connection is not None)  # this thread's connection, during the call
        return await summarize(**kwargs)

    monkeypatch.setattr(memory.tasks, "llm_memory_summary", watched)
    thread = _thread()
    # This thread's wrapper, taken here: inside the coroutine, ``connection`` names another context's.
    wrapper = connections["default"]
    assert wrapper.connection is not None
    fake_llm.enqueue(FakeReply(text=SUMMARY))

    assert remember_resolution(str(thread.pk)) == "remembered"

    assert held == [False]
    assert Memory.objects.get(user=thread.user).content == SUMMARY  # the write after it reconnected


@pytest.mark.django_db
@pytest.mark.parametrize("failure", ["error", "unusable reply"])
def test_an_llm_failure_falls_back_to_the_extractive_text(fake_llm, failure) -> None:
    thread = _thread()
    if failure == "error":
        fake_llm.enqueue_error(500, times=2)  # the summary call retries once
    else:
        fake_llm.enqueue(FakeReply(text="Sure! Here is a summary of the chat."))

    assert remember_resolution(str(thread.pk)) == "remembered"

    memory = Memory.objects.get(user=thread.user)
    assert memory.content == (
        "Problem: My login is broken, it says invalid password What helped: Reset your password from Settings, "
        "then sign in again. Outcome: Thanks, that fixed the login!"
    )
    assert memory.source["summary"] == "extractive"


@pytest.mark.django_db
def test_offline_no_llm_is_asked(fake_anthropic_server) -> None:
    fake_anthropic_server.reset()
    thread = _thread()

    assert remember_resolution(str(thread.pk)) == "remembered"

    assert Memory.objects.get(user=thread.user).source["summary"] == "extractive"
    assert fake_anthropic_server.requests == []


# --- session end -----------------------------------------------------------------------------


@pytest.mark.django_db
def test_an_ended_session_remembers_its_unresolved_threads_once() -> None:
    thread = _thread(resolved=False)
    assert remember_session(str(thread.session_id)) == "not ended"
    _expire(thread.session)

    assert remember_session(str(thread.session_id)) == "remembered 1"
    assert remember_session(str(thread.session_id)) == "remembered 1"  # idempotent: the memory is updated

    memory = Memory.objects.get(user=thread.user)
    assert memory.content == (
        "Problem: My login is broken, it says invalid password What was tried: Reset your password from Settings, "
        "then sign in again. Outcome: unresolved when the session ended."
    )
    assert memory.kind == "episodic"
    assert {k: memory.source[k] for k in ("session", "thread", "by", "summary")} == {
        "session": str(thread.session_id),
        "thread": str(thread.pk),
        "by": "session end",
        "summary": "extractive",
    }
    assert len(memory.source["messages"]) == 2
    assert Memory.objects.filter(user__isnull=True).count() == 0  # an unresolved thread teaches no pattern


@pytest.mark.django_db
def test_resolved_and_unanswered_threads_are_not_remembered_at_session_end() -> None:
    resolved = _thread("r", resolved=True)
    lonely = _thread("l", resolved=False, answered=False)
    _expire(resolved.session)
    _expire(lonely.session)

    assert remember_session(str(resolved.session_id)) == "remembered 0"
    assert remember_session(str(lonely.session_id)) == "remembered 0"
    assert remember_session("00000000-0000-0000-0000-000000000000") == "missing"
    assert Memory.objects.count() == 0


@pytest.mark.django_db
def test_session_end_uses_the_llm_summary_online(fake_llm) -> None:
    thread = _thread(resolved=False)
    _expire(thread.session)
    fake_llm.enqueue(FakeReply(text="Problem: login fails. What worked: nothing yet. Outcome: unresolved."))

    assert remember_session(str(thread.session_id)) == "remembered 1"

    memory = Memory.objects.get(user=thread.user)
    assert (memory.content, memory.source["summary"]) == (
        "Problem: login fails. What worked: nothing yet. Outcome: unresolved.",
        "llm",
    )
    assert (
        "How it ended: unresolved when the session ended"
        in fake_llm.requests[0]["body"]["messages"][0]["content"]
    )


@pytest.mark.django_db
def test_session_end_with_memory_disabled_writes_nothing(settings) -> None:
    thread = _thread(resolved=False)
    _expire(thread.session)
    settings.AGENTFLOW = {**settings.AGENTFLOW, "CONFIG": {"memory_config": {"enabled": False}}}

    assert remember_session(str(thread.session_id)) == "memory disabled"
    assert Memory.objects.count() == 0


@pytest.mark.django_db(transaction=True)
@pytest.mark.integration
async def test_coming_back_after_expiry_queues_the_session_memory(celery_worker, settings) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "BACKGROUND_JOBS": True}
    agent = await AgentFrameworkBuilder().with_intent_categories([]).build(None)
    first = await agent.process_message(user_id="back", message="My S3 backup fails with access denied")
    await ChatSession.objects.filter(pk=first["session_id"]).aupdate(expires_at=timezone.now())

    later = await agent.process_message(user_id="back", message="Hello again")

    assert later["session_id"] != first["session_id"]
    for _ in range(100):
        if await Memory.objects.filter(source__session=first["session_id"]).aexists():
            break
        await asyncio.sleep(0.1)
    memory = await Memory.objects.aget(source__session=first["session_id"])
    assert memory.content.startswith("Problem: My S3 backup fails with access denied What was tried:")
    assert memory.source["thread"] == first["thread_id"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.integration
def test_the_sweep_remembers_sessions_whose_user_never_came_back(celery_worker) -> None:
    recent = _thread("recent", resolved=False)
    old = _thread("old", resolved=False)
    _expire(recent.session, ago=timedelta(minutes=5))
    _expire(old.session, ago=timedelta(hours=2))  # outside the sweep's window: swept long ago

    assert sweep_ended_sessions() == 1

    for _ in range(100):
        if Memory.objects.exists():
            break
        import time

        time.sleep(0.1)
    assert list(Memory.objects.values_list("user__external_id", "source__session")) == [
        ("recent", str(recent.session_id))
    ]


def test_beat_runs_the_sweep_every_ten_minutes() -> None:
    from agentflow_project.celery import app

    assert app.conf.beat_schedule["memory-sweep-ended-sessions"] == {
        "task": "memory.sweep_ended_sessions",
        "schedule": 600.0,
    }


# --- retrieval at scale ----------------------------------------------------------------------


@pytest.mark.django_db
def test_a_users_memory_is_found_when_thousands_of_others_are_closer() -> None:
    """The case a filtered HNSW scan loses: every other user's memory beats the user's own."""
    rng = np.random.default_rng(3)
    query = np.zeros(384, dtype=np.float32)
    query[0] = 1.0
    others = [EndUser(agent=default_agent_row(), external_id=f"other-{i}") for i in range(50)]
    EndUser.objects.bulk_create(others)
    others = list(EndUser.objects.filter(external_id__startswith="other-"))
    near = rng.standard_normal((2000, 384)).astype(np.float32) * 0.01
    near[:, 0] = 1.0
    Memory.objects.bulk_create(
        Memory(
            agent=default_agent_row(),
            user=others[i % 50],
            kind="fact",
            content=f"other {i}",
            embedding=v / np.linalg.norm(v),
            embedding_model="m",
        )
        for i, v in enumerate(near)
    )
    alice = EndUser.objects.create(agent=default_agent_row(), external_id="alice")
    own = query.copy()
    own[1] = 1.0  # similarity 0.7071
    mine = Memory.objects.create(
        agent=default_agent_row(),
        user=alice,
        kind="fact",
        content="mine",
        embedding=own / np.linalg.norm(own),
        embedding_model="m",
    )

    found = memory_search(user=alice, embedding=query, limit=10, similarity_threshold=0.5)

    assert [(m["id"], m["similarity"]) for m in found] == [(str(mine.pk), 0.7071)]


@pytest.mark.django_db
@pytest.mark.parametrize("exact_max", [20_000, 0])
def test_global_memories_are_found_exactly_or_through_hnsw(exact_max, monkeypatch) -> None:
    """Both plans for the global memories (an exact scan while few, HNSW beyond) give the same answer."""
    from memory import selectors

    monkeypatch.setattr(selectors, "GLOBAL_EXACT_MAX", exact_max)
    monkeypatch.setattr(selectors, "_global_counts", {})  # count afresh
    rng = np.random.default_rng(4)
    vectors = rng.standard_normal((40, 384)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    Memory.objects.bulk_create(
        Memory(
            agent=default_agent_row(),
            user=None,
            kind="pattern",
            content=f"global {i}",
            embedding=v,
            embedding_model="m",
            approved=i != 0,
        )
        for i, v in enumerate(vectors)
    )
    alice = EndUser.objects.create(agent=default_agent_row(), external_id="alice")
    query = vectors[0] + vectors[1]  # global 0 (not approved) and 1 are the nearest

    found = memory_search(
        user=alice, embedding=query / np.linalg.norm(query), limit=3, similarity_threshold=0.0
    )

    expected = sorted(range(1, 40), key=lambda i: -float(vectors[i] @ query))[:3]
    assert [m["content"] for m in found] == [f"global {i}" for i in expected]
    assert selectors.approved_global_count(agent_id=default_agent_row().pk) == 39
    Memory.objects.filter(content="global 2").delete()
    assert (
        selectors.approved_global_count(agent_id=default_agent_row().pk) == 39
    )  # counted at most every few minutes per process
    assert selectors.approved_global_count(agent_id=default_agent_row().pk, max_age=0) == 38


@pytest.mark.django_db
def test_only_global_memories_have_an_hnsw_index() -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename = 'memory_memory' AND indexdef LIKE '%hnsw%'"
        )
        definitions = [row[0] for row in cursor.fetchall()]

    assert len(definitions) == 1
    assert definitions[0].endswith(
        "USING hnsw (embedding vector_cosine_ops) WITH (m='16', ef_construction='64') WHERE (user_id IS NULL)"
    )


# --- re-embedding ----------------------------------------------------------------------------

EMBEDDER_PATH = "tests.memory.test_memory_lifecycle.RenamedEmbedder"


@pytest.fixture
def stale_memories():
    """Five memories embedded by the current model, one already by the new one."""
    embedder = get_embedder()
    user = EndUser.objects.create(agent=default_agent_row(), external_id="alice")
    texts = ["Prefers email", "Uses the EU region", "Has two seats", "Paid yearly", "Reset the password"]
    rows = [memory_add(user=user, kind="fact", content=t, embedder=embedder) for t in texts]
    Memory.objects.filter(pk=rows[-1].pk).update(embedding_model=RenamedEmbedder.model_id)
    return rows


@pytest.mark.django_db
def test_reembed_command_updates_stale_memories_with_a_progress_bar(stale_memories, settings) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "EMBEDDER": EMBEDDER_PATH}
    out, err = io.StringIO(), io.StringIO()

    call_command("agentflow_reembed", "--batch-size", "3", stdout=out, stderr=err)

    assert out.getvalue() == "Re-embedded 4 memories with minilm-renamed-v2.\n"
    lines = err.getvalue().splitlines()
    assert [line.split("] ")[1].split(" (")[0] for line in lines] == ["3/4", "4/4"]
    assert lines[-1].startswith("[" + "#" * 30 + "] 4/4 (100%)")
    assert set(Memory.objects.values_list("embedding_model", flat=True)) == {"minilm-renamed-v2"}
    memory = Memory.objects.get(content="Paid yearly")
    np.testing.assert_allclose(
        np.asarray(memory.embedding), get_embedder().embed_one("Paid yearly"), atol=1e-6
    )

    again = io.StringIO()
    call_command("agentflow_reembed", stdout=again, stderr=io.StringIO())
    assert again.getvalue() == "Nothing to re-embed: every memory is embedded with minilm-renamed-v2.\n"

    forced = io.StringIO()
    call_command("agentflow_reembed", "--all", "--no-progress", stdout=forced, stderr=err)
    assert forced.getvalue() == "Re-embedded 5 memories with minilm-renamed-v2.\n"


@pytest.mark.django_db
def test_an_interrupted_reembed_resumes_where_it_stopped(stale_memories) -> None:
    embedder = get_embedder(EMBEDDER_PATH)

    def crash(count: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        memories_reembed(embedder=embedder, batch_size=2, on_batch=crash)
    assert Memory.objects.filter(embedding_model="minilm-renamed-v2").count() == 3  # one batch of 2 committed

    assert memories_reembed(embedder=embedder, batch_size=2) == 2
    assert Memory.objects.exclude(embedding_model="minilm-renamed-v2").count() == 0
    with pytest.raises(ValueError, match="batch_size must be at least 1; got 0"):
        memories_reembed(embedder=embedder, batch_size=0)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--batch-size", "0"], "--batch-size must be from 1 to 10000; got 0"),
        (["--batch-size", "10001"], "--batch-size must be from 1 to 10000; got 10001"),
        (["--embedder", "no.such.Embedder"], "cannot load the embedder 'no.such.Embedder'"),
        (["--embedder", "memory.models.Memory"], "is not an agentflow.embeddings.Embedder"),
    ],
)
def test_reembed_rejects_bad_arguments(stale_memories, args, error) -> None:
    before = sorted(Memory.objects.values_list("pk", "embedding_model"))

    with pytest.raises(CommandError, match=error):
        call_command("agentflow_reembed", *args, stdout=io.StringIO(), stderr=io.StringIO())

    assert sorted(Memory.objects.values_list("pk", "embedding_model")) == before


@pytest.mark.django_db
def test_reembed_rejects_a_non_numeric_batch_size() -> None:
    with pytest.raises(CommandError, match="invalid int value: 'many'"):
        call_command("agentflow_reembed", "--batch-size", "many")


# --- admin -----------------------------------------------------------------------------------


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_superuser("dana", "dana@example.com", "dana-password-123")


@pytest.mark.django_db
def test_admin_shows_provenance_links_and_last_use(client, staff, settings) -> None:
    share_globally(settings, review=False)
    thread = _thread()
    remember_resolution(str(thread.pk))
    memory = Memory.objects.get(user=thread.user)
    Memory.objects.filter(pk=memory.pk).update(use_count=3, last_used_at=timezone.now())
    client.force_login(staff)

    listing = client.get(reverse("admin:memory_memory_changelist"), {"q": "invalid password"})
    page = client.get(reverse("admin:memory_memory_change", args=[memory.pk]))

    assert listing.status_code == 200 and page.status_code == 200
    body = listing.content.decode()
    pattern = Memory.objects.get(user__isnull=True)
    assert set(listing.context["cl"].result_list) == {memory, pattern}  # both say "invalid password"
    assert body.count("(global)") == 1
    assert f'href="{reverse("admin:conversations_enduser_change", args=[thread.user_id])}">mem</a>' in body
    assert f'href="{reverse("admin:conversations_thread_change", args=[thread.pk])}"' in body
    detail = page.content.decode()
    for pk in memory.source["messages"]:
        assert f'href="{reverse("admin:conversations_message_change", args=[pk])}"' in detail
    assert "by resolution; summary: extractive; thread" in detail
    assert page.context["original"].use_count == 3


@pytest.mark.django_db
def test_admin_search_edit_and_delete(client, staff) -> None:
    embedder = get_embedder()
    user = EndUser.objects.create(agent=default_agent_row(), external_id="alice")
    memory = memory_add(user=user, kind="fact", content="Uses the EU region", embedder=embedder)
    other = memory_add(
        user=None,
        agent_id=default_agent_row().pk,
        kind="pattern",
        content="Invoices are emailed monthly",
        embedder=embedder,
    )
    client.force_login(staff)

    found = client.get(reverse("admin:memory_memory_changelist"), {"q": "alice"}).context["cl"].result_list
    assert list(found) == [memory]
    response = client.post(
        reverse("admin:memory_memory_change", args=[memory.pk]),
        {"agent": user.agent_id, "user": user.pk, "kind": "fact", "content": "Uses the US region"},
    )
    assert response.status_code == 302
    memory.refresh_from_db()
    assert memory.content == "Uses the US region"
    np.testing.assert_allclose(
        np.asarray(memory.embedding), embedder.embed_one("Uses the US region"), atol=1e-6
    )

    bad = client.post(
        reverse("admin:memory_memory_change", args=[memory.pk]),
        {"agent": user.agent_id, "user": user.pk, "kind": "gossip", "content": ""},
    )
    assert bad.status_code == 200 and bad.context["adminform"].form.errors.keys() == {"kind", "content"}
    memory.refresh_from_db()
    assert (memory.kind, memory.content) == ("fact", "Uses the US region")

    added = client.post(
        reverse("admin:memory_memory_add"),
        {"agent": user.agent_id, "kind": "pattern", "content": "Refunds take 5 days"},
    )
    assert added.status_code == 302
    assert Memory.objects.get(content="Refunds take 5 days").source == {"by": "staff dana"}

    client.post(reverse("admin:memory_memory_delete", args=[memory.pk]), {"post": "yes"})
    assert set(Memory.objects.values_list("pk", flat=True)) == {
        other.pk,
        Memory.objects.get(content__startswith="Refunds").pk,
    }
