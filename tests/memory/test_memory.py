"""Memories: storage, pgvector similarity search with per-user isolation, and their use in turns."""

from __future__ import annotations

import numpy as np
import pytest
from asgiref.sync import sync_to_async

from agentflow import AgentFrameworkBuilder, IntentCategory
from agentflow.embeddings import get_embedder
from agentflow.testing.fake_anthropic import FakeReply
from conversations.models import EndUser
from conversations.services import user_get_or_create
from memory.models import Memory
from memory.reference import MEMORY_PREAMBLE
from memory.selectors import memory_search
from memory.services import memories_mark_used, memory_add
from tests.conversations.factories import default_agent_row

QUESTION = "Can you contact me by email about my billing question?"
EMAIL_PREF = "The user prefers to be contacted by email, not by phone"
COLOUR = "User's favourite colour is green"
B_SECRET = "contact me by email about billing"  # user B's, and the closest to QUESTION of all
BILLING_SLA = "Billing questions are answered by the finance team within 2 days"
PASSWORD = "Resetting a password requires access to the account email"


@pytest.fixture(scope="module")
def embedder():
    return get_embedder()


def similarity(embedder, a: str, b: str) -> float:
    return float(embedder.embed_one(a) @ embedder.embed_one(b))


@pytest.fixture
def memories(embedder):
    """Users A and B with their own memories, and two global ones."""
    a = user_get_or_create(agent_id=default_agent_row().pk, external_id="user-a")
    b = user_get_or_create(agent_id=default_agent_row().pk, external_id="user-b")
    rows = {
        "email_pref": memory_add(user=a, kind="preference", content=EMAIL_PREF, embedder=embedder),
        "colour": memory_add(user=a, kind="fact", content=COLOUR, embedder=embedder),
        "b_secret": memory_add(user=b, kind="episodic", content=B_SECRET, embedder=embedder),
        "billing_sla": memory_add(
            user=None, agent_id=default_agent_row().pk, kind="pattern", content=BILLING_SLA, embedder=embedder
        ),
        "password": memory_add(
            user=None, agent_id=default_agent_row().pk, kind="pattern", content=PASSWORD, embedder=embedder
        ),
    }
    return a, b, rows


# --- memory_add ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_memory_add_stores_content_embedding_and_provenance(embedder):
    user = user_get_or_create(agent_id=default_agent_row().pk, external_id="user-a")

    memory = memory_add(
        user=user,
        kind="preference",
        content="  Prefers email  ",
        embedder=embedder,
        source={"thread": "t-1", "by": "admin"},
    )

    memory.refresh_from_db()
    assert memory.content == "Prefers email"
    assert memory.embedding_model == embedder.model_id
    assert memory.source == {"thread": "t-1", "by": "admin"}
    assert memory.use_count == 0 and memory.last_used_at is None
    np.testing.assert_allclose(np.asarray(memory.embedding), embedder.embed_one("Prefers email"), atol=1e-6)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("kind", "content", "error"),
    [
        ("fact", "   ", "a memory needs content"),
        ("gossip", "x", "unknown memory kind 'gossip'"),
    ],
)
def test_memory_add_rejects_bad_input(embedder, kind, content, error):
    with pytest.raises(ValueError, match=error):
        memory_add(user=None, agent_id=default_agent_row().pk, kind=kind, content=content, embedder=embedder)
    assert Memory.objects.count() == 0


# --- memory_search ---------------------------------------------------------------------------


@pytest.mark.django_db
def test_users_never_see_each_others_memories(embedder, memories):
    a, b, rows = memories
    query = embedder.embed_one(QUESTION)

    for_a = memory_search(user=a, embedding=query, limit=10, similarity_threshold=0.0)
    for_b = memory_search(user=b, embedding=query, limit=10, similarity_threshold=0.0)

    ids_a = {m["id"] for m in for_a}
    ids_b = {m["id"] for m in for_b}
    assert ids_a == {str(rows[k].pk) for k in ("email_pref", "colour", "billing_sla", "password")}
    assert ids_b == {str(rows[k].pk) for k in ("b_secret", "billing_sla", "password")}
    assert {m["content"] for m in for_a}.isdisjoint({B_SECRET})
    assert {m["content"] for m in for_b}.isdisjoint({EMAIL_PREF, COLOUR})


@pytest.mark.django_db
def test_the_search_runs_its_compiled_query_every_turn(embedder, memories):
    """The search is compiled once per connection: its vector must be found among the compiled
    parameters, or every turn would build and compile the UNION again (same rows, more CPU)."""
    from django.db import connections

    from memory.selectors import _MEMORY_CANDIDATES

    a, _, _ = memories
    first = memory_search(user=a, embedding=embedder.embed_one(QUESTION), limit=10, similarity_threshold=0.0)
    again = memory_search(user=a, embedding=embedder.embed_one(QUESTION), limit=10, similarity_threshold=0.0)

    assert first == again and first
    compiled = list(_MEMORY_CANDIDATES._by_connection[connections["default"]].values())
    assert compiled and all(c.usable for c in compiled)


@pytest.mark.django_db
def test_global_memories_reach_every_user(embedder, memories):
    _, _, rows = memories
    newcomer = user_get_or_create(agent_id=default_agent_row().pk, external_id="user-c")

    found = memory_search(
        user=newcomer, embedding=embedder.embed_one(QUESTION), limit=10, similarity_threshold=0.0
    )

    assert [(m["id"], m["scope"]) for m in found] == [
        (str(rows["billing_sla"].pk), "global"),
        (str(rows["password"].pk), "global"),
    ]


@pytest.mark.django_db
def test_results_are_ordered_by_similarity_with_exact_scores(embedder, memories):
    a, _, _ = memories

    found = memory_search(user=a, embedding=embedder.embed_one(QUESTION), limit=10, similarity_threshold=0.0)

    expected = sorted(
        (
            (content, similarity(embedder, QUESTION, content))
            for content in (EMAIL_PREF, COLOUR, BILLING_SLA, PASSWORD)
        ),
        key=lambda pair: -pair[1],
    )
    assert [m["content"] for m in found] == [content for content, _ in expected]
    for memory, (_, score) in zip(found, expected, strict=True):
        assert memory["similarity"] == pytest.approx(score, abs=1e-3)
    assert found[0] == {
        "id": found[0]["id"],
        "kind": "pattern",
        "content": BILLING_SLA,
        "scope": "global",
        "similarity": found[0]["similarity"],
        "score": found[0]["score"],  # similarity weighted by usefulness and recency (rank_score)
    }


@pytest.mark.django_db
def test_similarity_threshold_and_limit(embedder, memories):
    a, _, rows = memories
    query = embedder.embed_one(QUESTION)
    threshold = 0.25  # PASSWORD sits at 0.29 (0.32 with minilm-fp32), COLOUR at 0.09
    assert similarity(embedder, QUESTION, PASSWORD) > threshold > similarity(embedder, QUESTION, COLOUR)

    above = memory_search(user=a, embedding=query, limit=10, similarity_threshold=threshold)
    top_one = memory_search(user=a, embedding=query, limit=1, similarity_threshold=threshold)
    none = memory_search(user=a, embedding=query, limit=10, similarity_threshold=0.99)

    assert {m["id"] for m in above} == {str(rows[k].pk) for k in ("email_pref", "billing_sla", "password")}
    assert all(m["similarity"] >= threshold for m in above)
    assert [m["id"] for m in top_one] == [above[0]["id"]]
    assert none == []


@pytest.mark.django_db
def test_mark_used_counts_each_use(memories):
    _, _, rows = memories
    ids = [str(rows["email_pref"].pk), str(rows["billing_sla"].pk)]

    memories_mark_used(memory_ids=ids)
    memories_mark_used(memory_ids=ids[:1])
    memories_mark_used(memory_ids=[])

    counts = dict(Memory.objects.values_list("content", "use_count"))
    assert counts == {EMAIL_PREF: 2, BILLING_SLA: 1, COLOUR: 0, B_SECRET: 0, PASSWORD: 0}
    assert Memory.objects.filter(use_count__gt=0, last_used_at__isnull=True).count() == 0


# --- memories in a turn ----------------------------------------------------------------------

CATEGORIES = [
    IntentCategory(
        "BILLING", "Invoices, payments and plans", ["I was charged twice", "Where is my invoice?"]
    ),
    IntentCategory("ACCOUNT", "Login and account settings", ["I can't log in", "Change my email address"]),
]


def memory_builder(**memory_config) -> AgentFrameworkBuilder:
    return (
        AgentFrameworkBuilder()
        .with_intent_categories(CATEGORIES)
        .with_config(
            {
                "memory_config": {"similarity_threshold": 0.25, **memory_config},
                "confidence_config": {"default_threshold": 0.01},
            }
        )
    )


@pytest.mark.django_db(transaction=True)
async def test_turn_uses_the_users_and_global_memories(memories):
    _, _, rows = memories
    agent = await memory_builder().build(None)

    result = await agent.process_message(user_id="user-a", message=QUESTION)

    used = result["memories_used"]
    assert [m["id"] for m in used] == [
        str(rows["billing_sla"].pk),
        str(rows["email_pref"].pk),
        str(rows["password"].pk),
    ]
    assert [m["scope"] for m in used] == ["global", "user", "global"]
    assert all(m["similarity"] >= 0.25 for m in used)
    # Global memories' text came from other users' conversations: the result carries no text of theirs.
    assert [sorted(m) for m in used] == [
        ["id", "kind", "scope", "similarity"],
        ["content", "id", "kind", "scope", "score", "similarity"],
        ["id", "kind", "scope", "similarity"],
    ]
    assert used[1]["content"] == EMAIL_PREF
    assert result["offline"] is True
    counts = {str(pk): n async for pk, n in Memory.objects.values_list("pk", "use_count")}
    assert counts == {
        str(rows["billing_sla"].pk): 1,
        str(rows["email_pref"].pk): 1,
        str(rows["password"].pk): 1,
        str(rows["colour"].pk): 0,
        str(rows["b_secret"].pk): 0,
    }

    # User B's turn on the same question never sees A's memories, and counts its own.
    result_b = await agent.process_message(user_id="user-b", message=QUESTION)
    assert result_b["memories_used"][0]["id"] == str(rows["b_secret"].pk)
    assert str(rows["email_pref"].pk) not in {m["id"] for m in result_b["memories_used"]}
    assert (await Memory.objects.aget(pk=rows["billing_sla"].pk)).use_count == 2
    assert (await Memory.objects.aget(pk=rows["email_pref"].pk)).use_count == 1


@pytest.mark.django_db(transaction=True)
async def test_turn_memories_reach_the_llm_prompt(memories, anthropic_client, fake_llm):
    fake_llm.enqueue(FakeReply(text="I'll email you."))
    agent = await memory_builder(top_k=2).build(anthropic_client)

    result = await agent.process_message(user_id="user-a", message=QUESTION)

    assert len(result["memories_used"]) == 2
    system = fake_llm.requests[0]["body"]["system"]
    block = system[system.index("<memories>") : system.index("</memories>") + len("</memories>")]
    assert system.count("<memories>") == 1 and system.count("</memories>") == 1
    assert system.index(MEMORY_PREAMBLE) < system.index("<memories>")
    assert block == (
        "<memories>\n"
        f'<memory n="1" scope="global" kind="pattern">{BILLING_SLA}</memory>\n'
        f'<memory n="2" scope="user" kind="preference">{EMAIL_PREF}</memory>\n'
        "</memories>"
    )
    assert PASSWORD not in system and B_SECRET not in system and COLOUR not in system


@pytest.mark.django_db(transaction=True)
async def test_disabled_memory_is_not_searched(memories):
    agent = await memory_builder(enabled=False).build(None)

    result = await agent.process_message(user_id="user-a", message=QUESTION)

    assert result["memories_used"] == []
    assert await Memory.objects.filter(use_count__gt=0).acount() == 0


@pytest.mark.django_db(transaction=True)
async def test_a_user_with_nothing_to_find_skips_the_search_until_a_memory_exists(
    embedder, monkeypatch, anthropic_client, fake_llm
):
    from agentflow import pipeline

    searches: list[str] = []
    search = pipeline.memory_search

    def counting(**kwargs):  # type: ignore[no-untyped-def]
        searches.append(kwargs["user"].external_id)
        return search(**kwargs)

    monkeypatch.setattr(pipeline, "memory_search", counting)
    for _ in range(3):
        fake_llm.enqueue(FakeReply(text="Sure."))
    agent = await memory_builder().build(anthropic_client)

    # No memory of the user's own, no approved global one: nothing to search.
    first = await agent.process_message(user_id="newbie", message=QUESTION)
    assert first["memories_used"] == [] and searches == []

    # A memory stored meanwhile (by a worker, say) is found on the next turn.
    user = await EndUser.objects.aget(external_id="newbie")
    await sync_to_async(memory_add)(user=user, kind="preference", content=EMAIL_PREF, embedder=embedder)
    second = await agent.process_message(user_id="newbie", message=QUESTION)
    assert searches == ["newbie"] and [m["content"] for m in second["memories_used"]] == [EMAIL_PREF]

    # Another user with none of their own still gets the agent's approved global memories.
    await sync_to_async(memory_add)(
        user=None, agent_id=user.agent_id, kind="pattern", content=BILLING_SLA, embedder=embedder
    )
    other = await agent.process_message(user_id="second-newbie", message=QUESTION)
    assert searches == ["newbie", "second-newbie"]
    assert [m["scope"] for m in other["memories_used"]] == ["global"]
