"""Agents as records: many agents in one deployment, each rebuilt faithfully in every process.

The seed's three examples (support, e-commerce with middleware, personal assistant with its config
dict) live in one database here, under their own names.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connection
from django.test import AsyncClient, Client

from agentflow import AgentFrameworkBuilder, ConfigError, IntentCategory
from agentflow.loops import shared_db_executor
from agentflow.registry import agent_for, clear_agent_cache
from agentflow.testing.fake_anthropic import FakeReply
from agentflow_project.asgi import application
from conversations.agents import agent_get
from conversations.chat_tokens import chat_token_create
from conversations.models import Agent as AgentRow
from conversations.models import ApiKey, EndUser, Message, Thread
from conversations.services import api_key_create, user_get_or_create
from intents.models import IntentCategory as CategoryRow
from memory.models import Memory
from memory.selectors import memory_search
from memory.services import memory_add
from tests.conftest import ORIGIN

pytestmark = pytest.mark.django_db(transaction=True)

SUPPORT = [
    IntentCategory("QUERY", "General questions", ["How do I...", "What is..."]),
    IntentCategory("OUTAGE", "Production issues", ["Service is down", "Error 500"]),
    IntentCategory("ESCALATION", "Urgent issues", ["Critical", "Production down"]),
]
SHOP = [
    IntentCategory("PRODUCT_SEARCH", "Finding products", ["Show me...", "Do you have..."]),
    IntentCategory("ORDER_STATUS", "Order tracking", ["Where is my order", "Delivery"]),
    IntentCategory("RETURNS", "Returns & refunds", ["Return this", "Refund request"]),
]
ASSISTANT = [
    IntentCategory("SCHEDULE", "Calendar management", ["Schedule meeting", "Free time"]),
    IntentCategory("EMAIL", "Email tasks", ["Send email", "Check inbox"]),
    IntentCategory("TASKS", "Task management", ["Add to todo", "My tasks"]),
]
SCRIPT = ["My login is broken", "Actually, different question about S3", "Thanks, that fixed the login!"]


class InventoryMiddleware:
    async def before_turn(self, ctx: Any) -> None:
        ctx.system_additions.append("Stock levels: all items in stock.")


def support_builder() -> AgentFrameworkBuilder:
    return (
        AgentFrameworkBuilder()
        .with_config({"name": "support"})
        .with_intent_categories(SUPPORT)
        .with_confidence_thresholds({"QUERY": 0.5, "OUTAGE": 0.7, "ESCALATION": 0.0})
    )


def shop_builder() -> AgentFrameworkBuilder:
    return (
        AgentFrameworkBuilder()
        .with_config({"name": "shop"})
        .with_intent_categories(SHOP)
        .with_middleware([InventoryMiddleware()])
    )


def assistant_builder() -> AgentFrameworkBuilder:
    return (
        AgentFrameworkBuilder()
        .with_intent_categories(ASSISTANT)
        .with_config(
            {
                "name": "assistant",
                "session_config": {"ttl_seconds": 14400},
                "memory_config": {"max_episodic_per_user": 500},
            }
        )
    )


async def _turn_settled(message_id: str, wait: float = 20) -> None:
    """Wait until a queued turn is no longer pending or processing (if a worker runs in this session)."""
    deadline = time.monotonic() + wait
    while await Message.objects.filter(pk=message_id, status__in=["pending", "processing"]).aexists():
        if time.monotonic() > deadline:
            return  # no worker in this run: the turn stays queued, and nothing races the reset
        await asyncio.sleep(0.05)


def _names(result: dict[str, Any]) -> set[str]:
    return {result["intent"], *(r["intent"] for r in result["runners_up"])} - {None}


async def test_three_seed_agents_in_one_database_classify_only_against_their_own_categories() -> None:
    support = await support_builder().build(None)
    shop = await shop_builder().build(None)
    assistant = await assistant_builder().build(None)

    outage = await support.process_message(user_id="alice", message="The service is down, error 500")
    order = await shop.process_message(user_id="alice", message="Where is my order? No delivery yet")
    meeting = await assistant.process_message(user_id="alice", message="Schedule a meeting on Friday")

    assert outage["intent"] == "OUTAGE" and _names(outage) <= {c.name for c in SUPPORT}
    assert order["intent"] == "ORDER_STATUS" and _names(order) <= {c.name for c in SHOP}
    assert meeting["intent"] == "SCHEDULE" and _names(meeting) <= {c.name for c in ASSISTANT}
    categories = await sync_to_async(
        lambda: [{c.name for c in a.categories} for a in (support, shop, assistant)]
    )()
    assert categories == [{c.name for c in SUPPORT}, {c.name for c in SHOP}, {c.name for c in ASSISTANT}]
    # One person, three agents: three end users, three sessions, nothing shared.
    users = [
        u
        async for u in EndUser.objects.filter(external_id="alice")
        .order_by("agent__name")
        .values_list("agent__name", flat=True)
    ]
    assert users == ["assistant", "shop", "support"]
    assert await Thread.objects.filter(user__external_id="alice").values("session").distinct().acount() == 3
    assert (await sync_to_async(agent_get)(name="assistant")).config["session_config"]["ttl_seconds"] == 14400


async def test_the_threading_example_gives_the_same_events_alone_and_among_other_agents() -> None:
    support = await support_builder().build(None)
    alone = [await support.process_message(user_id="solo", message=text) for text in SCRIPT]
    await shop_builder().build(None)
    await assistant_builder().build(None)
    for text in ("Show me red shoes", "Where is my order", "Schedule meeting"):
        await (await shop_builder().build(None)).process_message(user_id="together", message=text)

    together = [await support.process_message(user_id="together", message=text) for text in SCRIPT]

    def shape(turns: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        first = turns[0]["thread_id"]
        return [(t["thread_event"], t["intent"], t["thread_id"] == first) for t in turns]

    assert shape(together) == shape(alone)
    assert [t["thread_event"] for t in alone] == ["NEW_TOPIC", "NEW_TOPIC", "RESOLUTION"]


async def test_an_in_process_turn_leaves_no_database_connection_on_the_shared_threads() -> None:
    # process_message on a shared event loop runs its steps on the process's database threads, the
    # ones a WebSocket consumer's steps use (agentflow.loops.run_db). A thread left holding a
    # connection would serve the consumer's next step with it, past a pool that refuses (PostgreSQL
    # down): each step gives its connection back to the pool.
    support = await support_builder().build(None)
    await support.process_message(user_id="alice", message="The service is down, error 500")

    db = shared_db_executor()
    threads = db._max_workers
    everyone = threading.Barrier(threads, timeout=30)

    def holds_one() -> tuple[int, bool]:
        everyone.wait()  # every thread of the pool answers once, at the same time
        return threading.get_ident(), connection.connection is not None

    held = await asyncio.gather(*(asyncio.wrap_future(db.submit(holds_one)) for _ in range(threads)))

    assert len({ident for ident, _ in held}) == threads
    assert [holding for _, holding in held] == [False] * threads


async def test_an_in_process_turn_after_postgresql_dropped_every_connection_works() -> None:
    # A database restart (or a proxy's idle timeout) ends the server side of every connection. One an
    # idle shared database thread kept would fail the next turn ("the connection is closed"); given
    # back to the pool, it is checked (CONN_HEALTH_CHECKS) and replaced when next asked for.
    support = await support_builder().build(None)
    await support.process_message(user_id="alice", message="The service is down, error 500")

    def restart() -> int:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return int(cursor.fetchone()[0])

    assert await sync_to_async(restart)() >= 1
    after = await support.process_message(user_id="alice", message="Is it still down? Error 500 again")

    assert after["intent"] is not None and after["thread_event"] is not None


async def test_a_users_memories_with_one_agent_never_reach_another_agents_prompt(
    anthropic_client, fake_llm
) -> None:
    support = await support_builder().build(anthropic_client)
    shop = await shop_builder().build(anthropic_client)
    fake_llm.enqueue(FakeReply(text="It ships today."))
    alice_support = await sync_to_async(user_get_or_create)(agent_id=support.record_id, external_id="alice")
    await sync_to_async(memory_add)(
        user=alice_support,
        kind="fact",
        content="Alice's order of lamps is delayed",
        embedder=support.embedder,
    )
    await sync_to_async(memory_add)(
        user=None,
        agent_id=support.record_id,
        kind="pattern",
        content="Orders of lamps are delayed this week",
        embedder=support.embedder,
    )

    reply = await shop.process_message(user_id="alice", message="Where is my order of lamps?")

    prompt = fake_llm.requests[-1]["body"]["system"]
    assert "lamps" not in prompt and "Stock levels: all items in stock." in prompt
    assert reply["content"] == "It ships today." and reply["memories_used"] == []
    vector = await asyncio.to_thread(support.embedder.embed_one, "Is my order of lamps delayed?")
    own = await sync_to_async(memory_search)(
        user=alice_support, embedding=vector, limit=5, similarity_threshold=0.3
    )
    assert {m["kind"] for m in own} == {"fact", "pattern"}


@pytest.mark.integration
async def test_the_personal_assistant_keeps_500_memories_through_a_real_worker(
    celery_worker, settings
) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "BACKGROUND_JOBS": True}
    assistant = await assistant_builder().build(None)
    await assistant.process_message(user_id="bob", message="Schedule meeting with the team")
    bob = await EndUser.objects.aget(agent__name="assistant", external_id="bob")
    texts = [f"Bob met client number {i} about project {i * 7}" for i in range(120)]
    vectors = await asyncio.to_thread(assistant.embedder.embed, texts)
    await Memory.objects.abulk_create(
        Memory(
            agent_id=assistant.record_id, user=bob, kind="fact", content=t, embedding=v, embedding_model="m"
        )
        for t, v in zip(texts, vectors, strict=True)
    )
    clear_agent_cache()  # the worker must not borrow this process's agent: it rebuilds it from its record

    # A stated preference is written by the worker's memory task, which evicts past the agent's limit.
    await sync_to_async(
        lambda: __import__("celery").current_app.send_task(
            "memory.remember_preference",
            args=[
                str(
                    Message.objects.create(
                        user=bob,
                        session=bob.sessions.first(),
                        role="user",
                        content="Please email me, don't call",
                        status="done",
                    ).pk
                )
            ],
        )
    )()
    deadline = time.monotonic() + 20
    while await Memory.objects.filter(user=bob, kind="preference").acount() == 0:
        assert time.monotonic() < deadline, "the worker did not write the preference"
        await asyncio.sleep(0.1)

    assert await Memory.objects.filter(user=bob).acount() == 121  # a default agent would keep 100


async def test_the_same_turn_through_process_message_rest_and_websocket_stores_identical_rows(
    celery_worker, api_key
) -> None:
    agent = await sync_to_async(agent_for)("agentflow")  # as the worker runs it: the declared default

    await agent.process_message(user_id="via-python", message="My login is broken")
    response = await AsyncClient().post(
        "/api/users/via-rest/messages",
        {"message": "My login is broken"},
        content_type="application/json",
        headers={"X-API-Key": api_key},
    )
    assert response.status_code == 200, response.content
    token = await sync_to_async(chat_token_create)(external_id="via-ws")
    communicator = WebsocketCommunicator(application, f"/ws/chat/?token={token}", headers=[ORIGIN])
    assert (await communicator.connect())[0]
    await communicator.receive_json_from()  # ready
    await communicator.send_json_to({"type": "message", "message": "My login is broken"})
    while (await communicator.receive_json_from(timeout=20))["type"] != "turn":
        pass
    await communicator.disconnect()

    fields = (
        "role",
        "content",
        "status",
        "thread_event",
        "thread_confidence",
        "intent",
        "confidence",
        "intent_candidates",
        "escalated",
        "offline",
        "model",
        "usage",
        "handled_by",
        "memories_used",
        "tool_calls",
        "error",
    )

    async def rows(user: str) -> list[dict[str, Any]]:
        found = Message.objects.filter(user__external_id=user).order_by("created_at").values(*fields)
        return [row async for row in found]

    python, rest, ws = await rows("via-python"), await rows("via-rest"), await rows("via-ws")
    assert len(python) == 2 and python == rest == ws
    topics = [
        t
        async for t in Thread.objects.filter(user__external_id__startswith="via-").values_list(
            "topic", "status", "intent"
        )
    ]
    assert len(set(topics)) == 1


@pytest.mark.integration
async def test_a_worker_that_cannot_load_the_agent_fails_the_message_with_the_reason(
    celery_worker, api_key
) -> None:
    # Built by a script elsewhere, with a handler this process does not have.
    await AgentRow.objects.acreate(
        name="scripted", code_parts={"handlers": ["ORDER_STATUS"]}, origin="script"
    )

    response = await AsyncClient().post(
        "/api/agents/scripted/users/carol/messages",
        {"message": "Where is my order?"},
        content_type="application/json",
        headers={"X-API-Key": api_key},
    )

    assert response.status_code == 503, response.content
    message = await Message.objects.aget(user__external_id="carol")
    assert message.status == "failed"
    assert message.error.startswith("agent unavailable: agent 'scripted' has handlers defined in code")
    assert "AGENTFLOW_AGENTS" in message.error
    assert await Message.objects.filter(role="assistant").acount() == 0


async def test_rest_paths_name_the_agent_and_keys_may_be_limited_to_one(celery_worker) -> None:
    await support_builder().build(None)
    await shop_builder().build(None)
    support_row = await AgentRow.objects.aget(name="support")
    _, support_only = await sync_to_async(api_key_create)(name="support-site", agent=support_row)
    client = AsyncClient()

    allowed = await client.post(
        "/api/agents/support/users/dave/messages",
        {"message": "Service is down", "wait_seconds": 0},
        content_type="application/json",
        headers={"X-API-Key": support_only},
    )
    refused = await client.post(
        "/api/agents/shop/users/dave/messages",
        {"message": "Where is my order", "wait_seconds": 0},
        content_type="application/json",
        headers={"X-API-Key": support_only},
    )
    unknown = await client.post(
        "/api/agents/nobody/users/dave/messages",
        {"message": "Hi", "wait_seconds": 0},
        content_type="application/json",
        headers={"X-API-Key": support_only},
    )
    bad_name = await client.get(
        "/api/agents/bad%20name/users/dave/threads", headers={"X-API-Key": support_only}
    )

    assert allowed.status_code == 202
    assert refused.status_code == 403
    assert refused.json() == {
        "error": {"code": "forbidden", "message": "this API key is limited to another agent than 'shop'"}
    }
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "not_found"
    assert bad_name.status_code == 400 and bad_name.json()["error"]["field"] == "agent"
    assert [u async for u in EndUser.objects.values_list("agent__name", "external_id")] == [
        ("support", "dave")
    ]
    assert await Message.objects.filter(role="user").acount() == 1
    await _turn_settled(allowed.json()["message_id"])  # the worker runs it: let it end before the reset
    assert (await ApiKey.objects.aget(name="support-site")).agent_id == support_row.pk


async def test_a_chat_token_is_bound_to_one_agent(celery_worker) -> None:
    await shop_builder().build(None)
    token = await sync_to_async(chat_token_create)(external_id="erin", agent="shop")
    communicator = WebsocketCommunicator(application, f"/ws/chat/?token={token}", headers=[ORIGIN])
    assert (await communicator.connect())[0]
    ready = await communicator.receive_json_from()
    await communicator.send_json_to(
        {"type": "message", "message": "Where is my order", "client_message_id": "c1"}
    )
    ack = await communicator.receive_json_from()
    await communicator.disconnect()
    await _turn_settled(ack["message_id"])

    assert (ready["type"], ready["agent"], ready["user_id"]) == ("ready", "shop", "erin")
    assert ack["type"] == "ack"
    message = await Message.objects.select_related("user__agent").aget(pk=ack["message_id"])
    assert (message.user.agent.name, message.user.external_id) == ("shop", "erin")

    ghost = await sync_to_async(chat_token_create)(external_id="erin", agent="ghost")
    refused = WebsocketCommunicator(application, f"/ws/chat/?token={ghost}", headers=[ORIGIN])
    await refused.connect()
    error = await refused.receive_json_from()
    closed = await refused.receive_output()
    assert error["code"] == "unauthorized" and "ghost" in error["message"]
    assert closed == {"type": "websocket.close", "code": 4401}
    assert await EndUser.objects.filter(agent__name="ghost").acount() == 0


def test_declared_agents_resolve_by_dotted_path_and_a_wrong_name_is_refused(settings) -> None:
    settings.AGENTFLOW = {
        **settings.AGENTFLOW,
        "AGENTS": {"shop": f"{__name__}:shop_builder", "odd": f"{__name__}:shop_builder"},
    }

    shop = agent_for("shop")

    assert shop.name == "shop" and [mw.__class__.__name__ for mw in shop.middleware] == [
        "InventoryMiddleware"
    ]
    assert agent_for("shop") is shop  # cached per process
    assert AgentRow.objects.get(name="shop").origin == f"{__name__}:shop_builder"
    with pytest.raises(
        ConfigError, match="built an agent named 'shop'; AGENTFLOW\\['AGENTS'\\] declares it as 'odd'"
    ):
        agent_for("odd")


def test_a_script_agent_without_code_parts_is_rebuilt_from_its_record_elsewhere() -> None:
    assistant = assistant_builder().build_sync(None)
    clear_agent_cache()  # another process: nothing built here

    rebuilt = agent_for("assistant")

    assert rebuilt is not assistant
    assert rebuilt.config.memory_config.max_episodic_per_user == 500
    assert rebuilt.config.session_config.ttl_seconds == 14400
    assert {c.name for c in rebuilt.categories} == {c.name for c in ASSISTANT}
    assert rebuilt.runs_jobs_inline is False


def test_redefining_an_agent_deactivates_the_categories_code_dropped(caplog) -> None:
    AgentFrameworkBuilder().with_intent_categories(SUPPORT).build_sync(None)
    with caplog.at_level("WARNING"):
        again = AgentFrameworkBuilder().with_intent_categories(SHOP).build_sync(None)

    active = set(
        CategoryRow.objects.filter(agent_id=again.record_id, active=True).values_list("name", flat=True)
    )
    assert active == {c.name for c in SHOP}
    messages = [r.getMessage() for r in caplog.records]
    assert any("is defined again in this process" in m for m in messages)
    assert (
        "agent agentflow: intent categories ESCALATION, OUTAGE, QUERY are no longer defined in code; deactivated"
        in messages
    )


def test_describe_shows_each_setting_with_its_source(monkeypatch) -> None:
    monkeypatch.setenv("AGENT_LLM_MODEL", "claude-haiku-5-5")
    agent = assistant_builder().with_confidence_thresholds({"EMAIL": 0.6}).build_sync(None)

    described = agent.describe()

    assert described["name"] == "assistant" and described["version"] == 1
    assert described["sources"]["memory_config.max_episodic_per_user"] == "dict"
    assert described["sources"]["llm_config.model"] == "env:AGENT_LLM_MODEL"
    assert described["sources"]["confidence_config.intent_specific.EMAIL"] == "code"
    assert "llm_config.temperature" not in described["sources"]  # a default
    assert {c["name"]: (c["threshold"], c["threshold_source"]) for c in described["categories"]} == {
        "EMAIL": (0.6, "code"),
        "SCHEDULE": (0.5, "default"),
        "TASKS": (0.5, "default"),
    }
    row = AgentRow.objects.get(name="assistant")
    assert row.sources == described["sources"] and json.dumps(row.config)


def test_admin_lists_filter_by_agent(django_user_model) -> None:
    support_builder().build_sync(None)
    shop_builder().build_sync(None)
    staff = django_user_model.objects.create_superuser("ops", "ops@example.com", "pw")
    client = Client()
    client.force_login(staff)
    shop = AgentRow.objects.get(name="shop")

    categories = client.get("/admin/intents/intentcategory/", {"agent__id__exact": shop.pk})
    agents = client.get("/admin/conversations/agent/")
    detail = client.get(f"/admin/conversations/agent/{shop.pk}/change/")

    assert [c.name for c in categories.context["cl"].result_list] == [
        "ORDER_STATUS",
        "PRODUCT_SEARCH",
        "RETURNS",
    ]
    assert agents.status_code == 200 and {a.name for a in agents.context["cl"].result_list} == {
        "support",
        "shop",
    }
    assert detail.status_code == 200
    assert b"InventoryMiddleware" in detail.content and b"session_config.ttl_seconds" in detail.content


SCRIPT_AGENT = """
import asyncio
from agentflow import AgentFrameworkBuilder, IntentCategory

async def main():
    agent = await (AgentFrameworkBuilder()
        .with_config({"name": "scripted", "memory_config": {"max_episodic_per_user": 500}})
        .with_intent_categories([IntentCategory("LOGIN", "Sign-in problems", ["My login is broken"])])
        .build(None))
    await agent.process_message(user_id="sam", message="My login is broken, it says invalid password")
    await agent.record_message(user_id="sam", content="Reset your password from Settings.")
    await agent.process_message(user_id="sam", message="Thanks, that fixed the login!")

asyncio.run(main())
"""


def test_a_script_with_no_worker_writes_its_agents_memories_itself(settings, tmp_path) -> None:
    """The seed's quick start as a plain script: no Celery worker runs, yet the memory of the
    resolved thread is written, by the script's own process, with the script's agent."""
    import os
    import subprocess
    import sys

    db = settings.DATABASES["default"]
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "agentflow_project.settings",
        "DATABASE_URL": f"postgresql://{db['USER']}:@/{db['NAME']}?host={db['HOST']}",
        "AGENTFLOW_CELERY_QUEUE": "nobody-consumes-this",
        "AGENTFLOW_BACKGROUND_JOBS": "true",
        "AGENTFLOW_AUTO_MIGRATE": "false",
        "DJANGO_DEBUG": "true",
    }
    env.pop("ANTHROPIC_API_KEY", None)
    script = tmp_path / "quickstart.py"
    script.write_text(SCRIPT_AGENT)

    done = subprocess.run(
        [sys.executable, str(script)], cwd=os.getcwd(), env=env, capture_output=True, text=True, timeout=120
    )

    assert done.returncode == 0, done.stderr[-2000:]
    memory = Memory.objects.get(user__external_id="sam", kind="episodic")
    assert memory.agent.name == "scripted"
    assert memory.content.startswith("Problem: My login is broken, it says invalid password")


def test_a_key_limited_to_one_agent_exports_and_erases_only_that_agents_user() -> None:
    support = support_builder().build_sync(None)
    shop = shop_builder().build_sync(None)
    for agent in (support, shop):
        user_get_or_create(agent_id=agent.record_id, external_id="fay")
    _, shop_key = api_key_create(name="shop-site", agent=AgentRow.objects.get(name="shop"))
    _, any_key = api_key_create(name="everything")
    client = Client()

    limited = client.get("/api/users/fay/export", headers={"X-API-Key": shop_key}).json()
    everything = client.get("/api/users/fay/export", headers={"X-API-Key": any_key}).json()
    erased = client.delete("/api/users/fay", headers={"X-API-Key": shop_key})

    assert limited["agents"] == ["shop"] and everything["agents"] == ["shop", "support"]
    assert erased.status_code == 200 and erased.json()["erased"]["users"] == 1
    assert list(EndUser.objects.values_list("agent__name", flat=True)) == ["support"]


def test_a_category_code_defines_again_comes_back_unless_staff_switched_it_off() -> None:
    AgentFrameworkBuilder().with_intent_categories(SUPPORT).build_sync(None)
    AgentFrameworkBuilder().with_intent_categories(SUPPORT[:2]).build_sync(None)  # ESCALATION dropped
    assert not CategoryRow.objects.get(name="ESCALATION").active
    CategoryRow.objects.filter(name="OUTAGE").update(active=False, staff_edited=["active"])  # staff: off

    AgentFrameworkBuilder().with_intent_categories(SUPPORT).build_sync(None)

    active = dict(CategoryRow.objects.values_list("name", "active"))
    assert active == {"QUERY": True, "OUTAGE": False, "ESCALATION": True}


async def test_stream_message_yields_the_websockets_events_in_order(anthropic_client, fake_llm) -> None:
    agent = (
        await AgentFrameworkBuilder()
        .with_config({"confidence_config": {"llm_self_assessment": False}})
        .build(anthropic_client)
    )
    fake_llm.enqueue(FakeReply(text="Reset your password from Settings, then sign in again."))

    events = [e async for e in agent.stream_message(user_id="gus", message="My login is broken")]

    kinds = [e["type"] for e in events]
    assert kinds[0] == "ack" and kinds[-2:] == ["thread", "turn"] and set(kinds[1:-2]) == {"delta"}
    deltas = [e for e in events if e["type"] == "delta"]
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    assert "".join(d["text"] for d in deltas) == events[-1]["content"]
    assert events[-1]["content"] == "Reset your password from Settings, then sign in again."
    assert events[-2] == {
        "type": "thread",
        "event": "NEW_TOPIC",
        "thread_id": events[-1]["thread_id"],
        "status": "open",
        "topic": "My login is broken",
    }
    assert events[0]["message_id"] == events[-1]["message_id"] and events[0]["duplicate"] is False


async def test_process_message_calls_a_plain_on_text_with_the_reply_as_it_is_written(
    anthropic_client, fake_llm
) -> None:
    agent = (
        await AgentFrameworkBuilder()
        .with_config({"confidence_config": {"llm_self_assessment": False}})
        .build(anthropic_client)
    )
    fake_llm.enqueue(FakeReply(text="One moment, checking your order."))
    pieces: list[str] = []

    result = await agent.process_message(user_id="hal", message="Where is my order?", on_text=pieces.append)

    assert "".join(pieces) == result["content"] == "One moment, checking your order."


@pytest.mark.django_db(transaction=True)
async def test_process_message_after_an_undecided_earlier_message_waits_and_places_in_order() -> None:
    # process_message stores the message and prepares its turn in one database step: when the user's
    # earlier message is still undecided, that step leaves the new one pending and the turn waits.
    from agentflow import pipeline

    support = await support_builder().build(None)
    first = "The service is down, error 500"
    earlier = (await sync_to_async(pipeline.accept)(support, user_id="dora", message=first)).message
    later_turn = asyncio.ensure_future(
        support.process_message(user_id="dora", message="Still down, error 500")
    )
    await asyncio.sleep(0.3)
    assert not later_turn.done()
    later_message = await Message.objects.exclude(pk=earlier.pk).aget(user__external_id="dora", role="user")
    assert later_message.status == "pending" and later_message.thread_id is None

    first_result = await support.run_turn(earlier.pk)
    later = await asyncio.wait_for(later_turn, 30)

    assert (first_result["thread_event"], later["thread_event"]) == ("NEW_TOPIC", "FOLLOW_UP")
    assert later["thread_id"] == first_result["thread_id"]
    assert later["message_id"] == str(later_message.pk) and later["status"] == "done"
