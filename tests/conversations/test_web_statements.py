"""The web process's SQL for a chat message: one read and the message's INSERT in a live session.

A WebSocket ``message`` frame in an open session used to cost four statements in a transaction of
its own (the agent's record, a resend's earlier copy, the live session with its user, the INSERT,
with BEGIN and COMMIT). It is now one compiled read (``conversations.services.message_snapshot``:
the agent's version, the user, their live session and a resend's earlier copy) and the INSERT, in
autocommit (docs/operations.md, "Web process CPU"). These tests pin that, and that the rules it
serves still hold: resends, rate limits, input checks, revoked tokens, a new agent version.
"""

from __future__ import annotations

import functools
import uuid
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agentflow.errors import RateLimited
from agentflow.loops import run_db
from agentflow.testing.fake_anthropic import FakeReply
from conversations import consumers
from conversations.agents import AgentSettings, agent_register, agent_settings, message_accept
from conversations.chat_tokens import chat_token_revoke
from conversations.models import Agent, Message
from conversations.services import rate_limit_check

from .factories import default_agent_row
from .helpers import chat_socket, receive_until, turn_settled

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGE_TABLE = Message._meta.db_table


class Statements:
    """The statements ``conversations.consumers`` ran in its database calls, each with whether it ran
    inside a transaction (an atomic block, or autocommit off)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bool]] = []

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        conn = context["connection"]
        self.seen.append((sql, conn.in_atomic_block or not conn.get_autocommit()))
        return execute(sql, params, many, context)

    def kinds(self) -> list[str]:
        return [sql.split(None, 1)[0].upper() for sql, _ in self.seen]

    def in_transaction(self) -> list[bool]:
        return [inside for _, inside in self.seen]

    def clear(self) -> None:
        self.seen.clear()


def _count_statements(monkeypatch: pytest.MonkeyPatch) -> Statements:
    statements = Statements()

    async def counting(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        @functools.wraps(func)
        def wrapped(*a: Any, **k: Any) -> Any:
            with connection.execute_wrapper(statements):  # this database thread's connection
                return func(*a, **k)

        return await run_db(wrapped, *args, **kwargs)

    monkeypatch.setattr(consumers, "run_db", counting)
    return statements


async def _send(communicator: Any, text: str, client_id: str) -> dict[str, Any]:
    """Send a message; its ``ack`` or ``error`` frame (frames of an earlier turn skipped)."""
    await communicator.send_json_to({"type": "message", "message": text, "client_message_id": client_id})
    while True:
        frame = await communicator.receive_json_from(timeout=20)
        if frame["type"] in ("ack", "error"):
            return frame


async def _turn(communicator: Any, fake_llm: Any, text: str, client_id: str, reply: str) -> None:
    fake_llm.enqueue(FakeReply(text=reply))
    ack = await _send(communicator, text, client_id)
    assert ack["type"] == "ack"
    await receive_until(communicator, "turn")
    await turn_settled(ack["message_id"])


async def _open_session(communicator: Any, fake_llm: Any) -> None:
    """A session with two turns: the worker's first build of the agent may store a new version of it
    (read by the second message, whose connection holds its limits from then on)."""
    await _turn(communicator, fake_llm, "Where is my order?", "s-1", "It ships tomorrow.")
    await _turn(communicator, fake_llm, "Thanks", "s-0", "You're welcome.")


async def test_a_message_in_a_live_session_is_one_read_and_one_insert_in_autocommit(
    celery_worker: Any, fake_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    communicator = await chat_socket("stmts-alice")
    statements = _count_statements(monkeypatch)
    await _turn(communicator, fake_llm, "Where is my order?", "s-1", "It ships tomorrow.")
    # The message that opened the session: the read, then one transaction under the user's lock.
    assert statements.kinds()[0] == "SELECT" and not statements.in_transaction()[0]
    assert all(statements.in_transaction()[1:])
    assert statements.kinds()[-1] == "INSERT" and MESSAGE_TABLE in statements.seen[-1][0]
    await _turn(communicator, fake_llm, "Thanks", "s-0", "You're welcome.")

    statements.clear()
    fake_llm.enqueue(FakeReply(text="Tomorrow before noon."))
    ack = await _send(communicator, "When exactly?", "s-3")
    turn, _ = await receive_until(communicator, "turn")

    assert ack["type"] == "ack" and ack["duplicate"] is False
    assert turn["status"] == "done"
    assert statements.kinds() == ["SELECT", "INSERT"], [q[:60] for q, _ in statements.seen]
    assert MESSAGE_TABLE in statements.seen[1][0]
    assert statements.in_transaction() == [False, False]  # no BEGIN/COMMIT: one autocommit INSERT
    stored = await Message.objects.aget(pk=ack["message_id"])
    assert (stored.content, stored.client_message_id, stored.role) == ("When exactly?", "s-3", "user")
    assert stored.session_id == (await Message.objects.aget(client_message_id="s-1")).session_id
    await communicator.disconnect()


async def test_a_resend_is_one_read_more_and_stores_nothing(
    celery_worker: Any, fake_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    communicator = await chat_socket("stmts-bob")
    await _open_session(communicator, fake_llm)
    statements = _count_statements(monkeypatch)
    before = await Message.objects.acount()

    again = await _send(communicator, "Where is my order?", "s-1")
    turn, _ = await receive_until(communicator, "turn")  # done: its reply is sent again

    assert again["type"] == "ack" and again["duplicate"] is True
    assert (turn["message_id"], turn["content"]) == (again["message_id"], "It ships tomorrow.")
    assert await Message.objects.acount() == before
    # The snapshot found the earlier copy; it is read whole, then its turn's result.
    assert "INSERT" not in statements.kinds()
    assert not any(statements.in_transaction())
    await communicator.disconnect()


def _empty_bucket(user_id: str, limits: AgentSettings) -> None:
    """Take the user's message tokens until the bucket refuses (their next message is refused)."""
    with pytest.raises(RateLimited):
        for _ in range(10_000):
            rate_limit_check(
                user_id=user_id, per_minute=limits.messages_per_minute, burst=limits.burst, now=timezone.now()
            )


async def test_a_rate_limited_or_invalid_message_in_a_live_session_stores_nothing(
    celery_worker: Any, fake_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    communicator = await chat_socket("stmts-carol")
    await _open_session(communicator, fake_llm)
    before = await Message.objects.acount()
    limits = await sync_to_async(agent_settings)(name="agentflow")
    too_long = await _send(communicator, "x" * (limits.max_message_chars + 1), "s-2")
    assert (too_long["type"], too_long["code"]) == ("error", "invalid_input")
    statements = _count_statements(monkeypatch)
    await sync_to_async(_empty_bucket)("stmts-carol", limits)
    limited = await _send(communicator, "Hello again", "s-3")
    assert (limited["type"], limited["code"]) == ("error", "rate_limited")

    assert await Message.objects.acount() == before
    assert statements.kinds() == ["SELECT"]  # the read, no write
    await communicator.disconnect()


async def test_a_revoked_token_stores_nothing_and_reads_nothing(
    celery_worker: Any, fake_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    communicator = await chat_socket("stmts-dave")
    await _open_session(communicator, fake_llm)
    statements = _count_statements(monkeypatch)
    before = await Message.objects.acount()
    await sync_to_async(chat_token_revoke)(external_id="stmts-dave")

    error = await _send(communicator, "Still there?", "s-2")
    closed = await communicator.receive_output(timeout=5)

    assert error["code"] == "user_erased"
    assert closed == {"type": "websocket.close", "code": consumers.CLOSE_ERASED}
    assert await Message.objects.acount() == before
    assert statements.seen == []


def _publish(agent: Agent, **input_config: Any) -> None:
    """A new version of ``agent`` as another process's build would store it."""
    config = {**agent.config, "input_config": {**agent.config.get("input_config", {}), **input_config}}
    agent_register(
        name=agent.name,
        config=config,
        fingerprint=uuid.uuid4().hex,
        code_parts=agent.code_parts,
        origin=agent.origin,
        sources=agent.sources,
    )


async def test_a_new_agent_version_takes_effect_on_an_open_connection(
    celery_worker: Any, fake_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    communicator = await chat_socket("stmts-erin")
    await _open_session(communicator, fake_llm)
    agent = await sync_to_async(default_agent_row)()
    statements = _count_statements(monkeypatch)

    await sync_to_async(_publish)(agent, max_message_chars=20)
    refused = await _send(communicator, "This message is longer than twenty characters", "s-2")

    assert (refused["type"], refused["code"]) == ("error", "invalid_input")
    assert "20" in refused["message"]
    # The read saw the new version; its limits were read (id and version, then the record).
    assert statements.kinds()[:2] == ["SELECT", "SELECT"]

    statements.clear()
    fake_llm.enqueue(FakeReply(text="Yes."))
    ack = await _send(communicator, "Short one", "s-3")
    await receive_until(communicator, "turn")
    assert ack["type"] == "ack"
    assert statements.kinds() == ["SELECT", "INSERT"]  # the connection holds the new limits
    await communicator.disconnect()


def test_agent_settings_reads_the_id_and_version_and_keeps_each_versions_limits() -> None:
    agent = default_agent_row()
    first = agent_settings(name=agent.name)
    with CaptureQueriesContext(connection) as queries:
        again = agent_settings(name=agent.name)
    assert again == first
    assert len(queries) == 1
    selected = queries[0]["sql"].split(" FROM ")[0]
    assert '"version"' in selected and '"config"' not in selected

    _publish(agent, max_message_chars=33)
    newer = agent_settings(name=agent.name)
    assert (newer.version, newer.max_message_chars) == (first.version + 1, 33)
    with CaptureQueriesContext(connection) as queries:
        assert agent_settings(name=agent.name) == newer
    assert len(queries) == 1


def test_this_process_agent_variables_still_win_over_kept_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    agent = default_agent_row()
    before = agent_settings(name=agent.name)
    monkeypatch.setenv("AGENT_RATE_LIMIT_MESSAGES_PER_MINUTE", "3")
    assert agent_settings(name=agent.name).messages_per_minute == 3
    monkeypatch.delenv("AGENT_RATE_LIMIT_MESSAGES_PER_MINUTE")
    assert agent_settings(name=agent.name) == before


def test_the_snapshot_reads_the_user_and_live_session_as_the_orm_does() -> None:
    from conversations.models import ChatSession, EndUser
    from conversations.services import message_snapshot

    agent = default_agent_row()
    limits = agent_settings(name=agent.name)
    EndUser.objects.create(agent=agent, external_id="snap-alice", metadata={"plan": "pro", "n": [1, 2]})
    stored = message_accept(limits=limits, user_id="snap-alice", message="Hello", client_message_id="k-1")
    now = timezone.now()

    with CaptureQueriesContext(connection) as queries:
        snap = message_snapshot(agent_id=agent.pk, external_id="snap-alice", client_id="k-1", now=now)
    assert len(queries) == 1
    assert snap is not None
    user, session = (
        EndUser.objects.get(external_id="snap-alice"),
        ChatSession.objects.get(user__external_id="snap-alice"),
    )
    fields = [f.attname for f in EndUser._meta.concrete_fields]
    assert [getattr(snap.user, f) for f in fields] == [getattr(user, f) for f in fields]
    fields = [f.attname for f in ChatSession._meta.concrete_fields]
    assert [getattr(snap.session, f) for f in fields] == [getattr(session, f) for f in fields]
    assert (snap.agent_version, snap.duplicate_id) == (agent.version, stored.message.pk)

    # No client id, another user, an expired session, another agent: nothing of theirs.
    assert (
        message_snapshot(agent_id=agent.pk, external_id="snap-alice", client_id="", now=now).duplicate_id
        is None
    )
    assert message_snapshot(agent_id=agent.pk, external_id="snap-bob", client_id="k-1", now=now) == (
        agent.version,
        None,
        None,
        None,
    )
    later = session.expires_at + timedelta(seconds=1)
    expired = message_snapshot(agent_id=agent.pk, external_id="snap-alice", client_id="k-1", now=later)
    assert expired is not None and expired.session is None and expired.user is not None
    other = Agent.objects.create(name="snap-other")
    assert (
        message_snapshot(agent_id=other.pk, external_id="snap-alice", client_id="k-1", now=now).user is None
    )
    assert (
        message_snapshot(agent_id=other.pk + 1000, external_id="snap-alice", client_id="k-1", now=now) is None
    )
