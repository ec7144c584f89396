"""Agent.detect_thread and Agent.record_message: the thread step on its own, and history imports."""

from __future__ import annotations

import pytest

from agentflow import AgentFrameworkBuilder, ConfigError, InvalidInput, NotFound
from conversations.models import EndUser, Message, Thread

pytestmark = pytest.mark.django_db(transaction=True)


async def _agent(config: dict | None = None):
    builder = AgentFrameworkBuilder().with_intent_categories([])
    if config:
        builder.with_config(config)
    return await builder.build(None)


async def test_detect_thread_places_messages_without_replying() -> None:
    agent = await _agent()

    opened = await agent.detect_thread(user_id="imp", message="My login is broken")
    await agent.record_message(user_id="imp", content="Which error do you see?")
    detail = await agent.detect_thread(user_id="imp", message="It says invalid password")
    switched = await agent.detect_thread(user_id="imp", message="Actually, different question about S3")
    thanks = await agent.detect_thread(user_id="imp", message="Thanks, that fixed the login!")

    login, s3 = opened["thread_id"], switched["thread_id"]
    assert [(d["thread_event"], d["thread_id"]) for d in (opened, detail, switched, thanks)] == [
        ("NEW_TOPIC", login),
        ("FOLLOW_UP", login),
        ("NEW_TOPIC", s3),
        ("RESOLUTION", login),
    ]
    assert all(d["embedding_ms"] > 0 for d in (opened, detail, switched, thanks))
    assert detail["signals"]["profile"] == "task"
    assert detail["decision_ms"] == detail["signals"]["decision_ms"]
    stored = [
        (m.role, m.status, str(m.thread_id))
        async for m in Message.objects.filter(user__external_id="imp").order_by("created_at")
    ]
    assert stored == [
        ("user", "done", login),
        ("assistant", "done", login),
        ("user", "done", login),
        ("user", "done", s3),
        ("user", "done", login),
    ]
    thread = await Thread.objects.aget(pk=login)
    assert (thread.status, thread.last_assistant_text) == ("resolved", "Which error do you see?")
    assert "error" in thread.vocabulary


async def test_detect_thread_rejects_bad_input_and_stores_nothing() -> None:
    agent = await _agent()

    with pytest.raises(InvalidInput) as error:
        await agent.detect_thread(user_id="imp", message="   ")

    assert error.value.field == "message"
    assert await EndUser.objects.acount() == 0
    assert await Message.objects.acount() == 0


async def test_record_message_rejects_bad_input_and_stores_nothing() -> None:
    agent = await _agent()
    with pytest.raises(NotFound):
        await agent.record_message(user_id="nobody", content="hello")
    await agent.detect_thread(user_id="imp", message="My login is broken")

    with pytest.raises(InvalidInput) as bad_role:
        await agent.record_message(user_id="imp", content="hi", role="user")
    with pytest.raises(InvalidInput) as empty:
        await agent.record_message(user_id="imp", content="")

    assert (bad_role.value.field, empty.value.field) == ("role", "message")
    assert await Message.objects.acount() == 1


async def test_record_message_needs_a_thread() -> None:
    agent = await _agent()
    await EndUser.objects.acreate(agent_id=agent.record_id, external_id="fresh")

    with pytest.raises(InvalidInput) as error:
        await agent.record_message(user_id="fresh", content="Hello from the past")

    assert error.value.field == "user_id"
    assert await Message.objects.acount() == 0


async def test_chitchat_profile_is_used_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    from_config = await _agent({"session_config": {"threading_profile": "chitchat"}})
    monkeypatch.setenv("AGENT_SESSION_THREADING_PROFILE", "chitchat")
    from_env = await _agent()

    assert from_config.thread_model.profile == from_env.thread_model.profile == "chitchat"
    await from_config.detect_thread(user_id="talk", message="hello, how are you today?")
    second = await from_config.detect_thread(user_id="talk", message="do you have any pets?")
    assert second["signals"]["profile"] == "chitchat"


async def test_unknown_threading_profile_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"session_config\.threading_profile"):
        await _agent({"session_config": {"threading_profile": "gossip"}})
