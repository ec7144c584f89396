"""The web process's SQL for a chat message: ONE statement in a live session.

A WebSocket ``message`` frame in an open session cost four statements in a transaction of its own,
then one compiled read and an ``INSERT`` in autocommit (``message_snapshot``). It is now one
statement (``conversations.message_sql.message_store_live``: the snapshot read, the ``INSERT``, the
user's ``last_seen_at`` and the session's expiry when due), in autocommit: one round trip, one
transaction (docs/operations.md, "Web process CPU"). These tests pin that, and that the rules it
serves still hold, in their order: input checks, resends (answered with their first copy, not
counted by the rate limit), rate limits (nothing stored), revoked tokens, a new agent version, a
session opened or expired, a copy stored by another process at the same moment, and the row locks.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError, connection, connections, transaction
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agentflow.errors import InvalidInput, RateLimited
from agentflow.loops import run_db
from agentflow.testing.fake_anthropic import FakeReply
from conversations import consumers
from conversations.agents import (
    AgentSettings,
    HeldLimits,
    Received,
    agent_register,
    agent_settings,
    message_accept,
    message_accept_held,
)
from conversations.chat_tokens import chat_token_revoke
from conversations.models import Agent, ChatSession, EndUser, Message
from conversations.ratelimit import user_message_give_back, user_message_take
from conversations.services import rate_limit_check

from .factories import default_agent_row
from .helpers import astored_counts, chat_socket, receive_until, stored_counts, turn_settled

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


INSERT_MESSAGE = f'INSERT INTO "{MESSAGE_TABLE}"'


async def test_a_message_in_a_live_session_is_one_statement_in_autocommit(
    celery_worker: Any, fake_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    communicator = await chat_socket("stmts-alice")
    statements = _count_statements(monkeypatch)
    await _turn(communicator, fake_llm, "Where is my order?", "s-1", "It ships tomorrow.")
    # The message that opened the session: the one statement (it found no session and stored
    # nothing), then one transaction under the user's lock that opens the session and stores it.
    assert statements.kinds()[0] == "WITH" and not statements.in_transaction()[0]
    assert all(statements.in_transaction()[1:])
    assert statements.kinds()[-1] == "INSERT" and MESSAGE_TABLE in statements.seen[-1][0]
    await _turn(communicator, fake_llm, "Thanks", "s-0", "You're welcome.")

    statements.clear()
    fake_llm.enqueue(FakeReply(text="Tomorrow before noon."))
    ack = await _send(communicator, "When exactly?", "s-3")
    turn, _ = await receive_until(communicator, "turn")

    assert ack["type"] == "ack" and ack["duplicate"] is False
    assert turn["status"] == "done"
    assert statements.kinds() == ["WITH"], [q[:60] for q, _ in statements.seen]
    assert INSERT_MESSAGE in statements.seen[0][0]
    assert statements.in_transaction() == [False]  # no BEGIN/COMMIT: one autocommit statement
    stored = await Message.objects.aget(pk=ack["message_id"])
    assert (stored.content, stored.client_message_id, stored.role, stored.status) == (
        "When exactly?",
        "s-3",
        "user",
        "done",
    )
    first = await Message.objects.aget(client_message_id="s-1")
    assert (stored.session_id, stored.user_id) == (first.session_id, first.user_id)
    assert stored.thread_id is not None  # its turn ran from the stored row
    await communicator.disconnect()


async def test_a_resend_is_one_statement_and_stores_nothing(
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
    # The statement found the earlier copy (read whole, stored nothing); then its turn's result.
    assert statements.kinds()[0] == "WITH"
    assert all(kind == "SELECT" for kind in statements.kinds()[1:])
    assert not any(statements.in_transaction())
    await communicator.disconnect()


def _empty_bucket(user_id: str, limits: AgentSettings) -> None:
    """Take the user's message tokens until the bucket refuses (their next message is refused)."""
    with pytest.raises(RateLimited):
        for _ in range(10_000):
            rate_limit_check(
                user_id=user_id, per_minute=limits.messages_per_minute, burst=limits.burst, now=timezone.now()
            )


async def test_a_rate_limited_message_stores_nothing_and_a_resend_is_still_answered(
    celery_worker: Any, fake_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    communicator = await chat_socket("stmts-carol")
    await _open_session(communicator, fake_llm)
    before = await Message.objects.acount()
    limits = await sync_to_async(agent_settings)(name="agentflow")
    statements = _count_statements(monkeypatch)
    await sync_to_async(_empty_bucket)("stmts-carol", limits)

    limited = await _send(communicator, "Hello again", "s-3")
    assert (limited["type"], limited["code"], limited["client_message_id"]) == (
        "error",
        "rate_limited",
        "s-3",
    )
    assert limited["retry_after"] >= 1 and "too many messages" in limited["message"]
    assert await Message.objects.acount() == before
    assert statements.kinds() == ["SELECT"]  # refused before the store: the read (is it a resend?)

    statements.clear()
    again = await _send(communicator, "Where is my order?", "s-1")  # a resend, bucket still empty
    turn, _ = await receive_until(communicator, "turn")
    assert (again["type"], again["duplicate"]) == ("ack", True)
    first = await Message.objects.aget(client_message_id="s-1")
    assert (again["message_id"], turn["content"]) == (str(first.pk), "It ships tomorrow.")
    assert await Message.objects.acount() == before
    assert "INSERT" not in statements.kinds() and statements.kinds()[0] == "SELECT"
    await communicator.disconnect()


@pytest.mark.parametrize(
    ("frame", "field", "reads"),
    [
        ({"message": "   "}, "message", ["SELECT"]),
        ({"message": "\x00\x01"}, "message", ["SELECT"]),
        ({"message": 42}, "message", ["SELECT"]),
        ({"message": "too long"}, "message", ["SELECT"]),  # over the agent's limit (below)
        ({"message": "Hi", "client_message_id": "has space"}, "client_message_id", []),
        ({"message": "Hi", "client_message_id": "x" * 101}, "client_message_id", []),
    ],
    ids=["blank", "control-only", "not-a-string", "too-long", "bad-client-id", "client-id-too-long"],
)
async def test_bad_input_in_a_live_session_is_a_clear_error_and_stores_nothing(
    celery_worker: Any,
    fake_llm: Any,
    monkeypatch: pytest.MonkeyPatch,
    frame: dict[str, Any],
    field: str,
    reads: list[str],
) -> None:
    communicator = await chat_socket("stmts-frank")
    await _open_session(communicator, fake_llm)
    limits = await sync_to_async(agent_settings)(name="agentflow")
    if frame["message"] == "too long":
        frame = {**frame, "message": "x" * (limits.max_message_chars + 1)}
    before = await astored_counts()
    await sync_to_async(_empty_bucket)("stmts-frank", limits)  # the input checks come first
    statements = _count_statements(monkeypatch)

    await communicator.send_json_to({"type": "message", "client_message_id": "s-9", **frame})
    error, _ = await receive_until(communicator, "error")

    sent_id = frame.get("client_message_id", "s-9")
    assert (error["code"], error["field"], error["client_message_id"]) == ("invalid_input", field, sent_id)
    assert error["message"]
    assert await astored_counts() == before
    # Refused by the checks before any write: a message is read first (a newer agent version could
    # allow it); a bad client id needs no SQL at all.
    assert statements.kinds() == reads
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
    assert "the limit is 20" in refused["message"]
    assert not await Message.objects.filter(client_message_id="s-2").aexists()
    # The statement saw the new version and stored nothing; its limits were read (id and version,
    # then the record); under them the message is refused, after a read (no write).
    assert statements.kinds() == ["WITH", "SELECT", "SELECT", "SELECT"], [q[:60] for q, _ in statements.seen]

    statements.clear()
    fake_llm.enqueue(FakeReply(text="Yes."))
    ack = await _send(communicator, "Short one", "s-3")
    await receive_until(communicator, "turn")
    assert ack["type"] == "ack"
    assert statements.kinds() == ["WITH"]  # the connection holds the new limits
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


# --- the service every transport calls (REST and in-process: message_accept; WebSocket: _held) ------


def _limits(**changes: Any) -> AgentSettings:
    """The default agent's limits, with ``changes`` (a slow refill: no token comes back mid-test)."""
    return dataclasses.replace(agent_settings(name=default_agent_row().name), **changes)


def _accept(
    limits: AgentSettings, text: str, client_id: str | None = None, user: str = "svc-alice"
) -> Received:
    return message_accept(limits=limits, user_id=user, message=text, client_message_id=client_id)


def test_message_accept_in_a_live_session_is_one_statement() -> None:
    limits = _limits()
    first = _accept(limits, "Hello", "m-1").message  # opens the session

    with CaptureQueriesContext(connection) as queries:
        second = _accept(limits, "Still there?", "m-2")

    assert [q["sql"].split(None, 1)[0] for q in queries] == ["WITH"]
    assert INSERT_MESSAGE in queries[0]["sql"]
    assert second.created and second.run
    stored = Message.objects.get(pk=second.message.pk)
    fields = [f.attname for f in Message._meta.concrete_fields]
    assert [getattr(second.message, f) for f in fields] == [getattr(stored, f) for f in fields]
    assert (stored.session_id, stored.user_id, stored.status) == (first.session_id, first.user_id, "pending")
    assert (stored.content, stored.client_message_id, stored.role) == ("Still there?", "m-2", "user")
    assert second.message.session.pk == first.session_id and second.message.user.external_id == "svc-alice"
    assert not second.message._state.adding

    with CaptureQueriesContext(connection) as queries:  # no client id: one statement as well
        third = _accept(limits, "And no id")
    assert len(queries) == 1 and third.created and third.message.client_message_id == ""


def test_a_resend_is_answered_with_its_first_copy_and_not_counted_by_the_rate_limit() -> None:
    limits = _limits(messages_per_minute=1, burst=3)
    first = _accept(limits, "Hello", "m-1").message
    for _ in range(3):  # resends: each one statement, nothing stored, no token kept
        with CaptureQueriesContext(connection) as queries:
            again = _accept(limits, "Hello", "m-1")
        assert (again.message.pk, again.created, len(queries)) == (first.pk, False, 1)
        assert again.message.content == "Hello" and again.message.status == "pending"
    _accept(limits, "Two", "m-2")
    _accept(limits, "Three", "m-3")  # the third token: the resends took none

    with pytest.raises(RateLimited) as refused:
        _accept(limits, "Four", "m-4")
    assert "too many messages" in str(refused.value) and refused.value.retry_after >= 1
    assert not Message.objects.filter(client_message_id="m-4").exists()
    assert _accept(limits, "Hello", "m-1").message.pk == first.pk  # the bucket is empty: still answered
    assert Message.objects.filter(user__external_id="svc-alice").count() == 3


def test_bad_input_takes_no_token_and_stores_nothing() -> None:
    limits = _limits(messages_per_minute=1, burst=2)
    _accept(limits, "Hello", "m-1")  # opens the session: one token of two
    before = stored_counts()
    for text, client_id in [("", "m-2"), ("x" * (limits.max_message_chars + 1), "m-2"), ("Hi", "bad id")]:
        with pytest.raises(InvalidInput):
            _accept(limits, text, client_id)
    assert stored_counts() == before
    assert _accept(limits, "The second token", "m-3").created
    with pytest.raises(RateLimited):
        _accept(limits, "No third", "m-4")


def test_a_first_message_and_one_after_expiry_open_a_session() -> None:
    limits = _limits()
    with CaptureQueriesContext(connection) as queries:
        first = _accept(limits, "Hello", "m-1", user="svc-new").message
    # The statement found no user (stored nothing); the user (in a savepoint: another request may
    # insert them first), the session and the message are then stored in one transaction, with no
    # second read of the user.
    kinds = [q["sql"].split(None, 1)[0] for q in queries]
    assert kinds == ["WITH", "BEGIN", "SAVEPOINT", "INSERT", "RELEASE", "INSERT", "INSERT", "COMMIT"], kinds
    assert EndUser.objects.filter(external_id="svc-new").count() == 1
    opened = ChatSession.objects.get(user__external_id="svc-new")
    assert (first.session_id, opened.status, opened.ttl_seconds) == (opened.pk, "active", limits.ttl_seconds)

    ended_at = timezone.now() - timedelta(seconds=1)
    ChatSession.objects.filter(pk=opened.pk).update(expires_at=ended_at)
    after = _accept(limits, "Back again", "m-2", user="svc-new")

    assert after.created and after.message.session_id != opened.pk
    old, new = ChatSession.objects.get(pk=opened.pk), ChatSession.objects.get(pk=after.message.session_id)
    assert (old.status, old.ended_at, new.status) == ("expired", ended_at, "active")
    with CaptureQueriesContext(connection) as queries:
        third = _accept(limits, "And again", "m-3", user="svc-new")
    assert len(queries) == 1 and third.message.session_id == new.pk


def test_a_newer_agent_version_can_allow_what_the_held_limits_refuse() -> None:
    agent = default_agent_row()
    _publish(agent, max_message_chars=20)
    held = HeldLimits(agent_settings(name=agent.name))
    assert held.limits.max_message_chars == 20
    _publish(Agent.objects.get(pk=agent.pk), max_message_chars=200)  # another process, meanwhile

    text = "Longer than twenty characters, shorter than two hundred"
    received = message_accept_held(held=held, user_id="svc-bob", message=text, client_message_id="m-1")

    assert received.created and received.message.content == text
    assert (held.limits.version, held.limits.max_message_chars) == (agent.version + 2, 200)


def test_last_seen_and_the_session_expiry_are_written_by_the_same_statement_when_due() -> None:
    limits = _limits()
    first = _accept(limits, "Hello", "m-1").message
    session = ChatSession.objects.get(pk=first.session_id)
    ttl = timedelta(seconds=session.ttl_seconds)
    long_ago = timezone.now() - timedelta(minutes=5)
    ChatSession.objects.filter(pk=session.pk).update(last_activity_at=long_ago, expires_at=long_ago + ttl)
    EndUser.objects.filter(pk=first.user_id).update(last_seen_at=long_ago)

    with CaptureQueriesContext(connection) as queries:
        due = _accept(limits, "Due now", "m-2").message
    assert len(queries) == 1
    user, session = EndUser.objects.get(pk=first.user_id), ChatSession.objects.get(pk=session.pk)
    assert user.last_seen_at == due.user.last_seen_at and user.last_seen_at > long_ago + timedelta(minutes=4)
    assert (session.last_activity_at, session.expires_at) == (
        due.session.last_activity_at,
        due.session.expires_at,
    )
    assert session.expires_at == session.last_activity_at + ttl == user.last_seen_at + ttl

    with CaptureQueriesContext(connection) as queries:  # moments later: neither is due
        _accept(limits, "Not due", "m-3")
    assert len(queries) == 1
    assert EndUser.objects.get(pk=first.user_id).last_seen_at == user.last_seen_at
    assert ChatSession.objects.get(pk=session.pk).expires_at == session.expires_at


def _in_thread(call: Any) -> concurrent.futures.Future[Any]:
    """``call`` on a thread of its own (its own database connection, closed at the end)."""

    def run() -> Any:
        try:
            return call()
        finally:
            connections.close_all()

    pool = concurrent.futures.ThreadPoolExecutor(1)
    future = pool.submit(run)
    pool.shutdown(wait=False)
    return future


def _waiting_on_a_lock(marker: str) -> bool:
    """Whether a backend running a statement containing ``marker`` waits on a lock."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND wait_event_type = 'Lock' AND query LIKE %s",
            [f"%{marker}%"],
        )
        return bool(cursor.fetchone()[0])


def _until(predicate: Any, what: str) -> None:
    for _ in range(400):
        if predicate():
            return
        time.sleep(0.025)
    raise AssertionError(f"never happened: {what}")


def _user_holder(user_pk: int, locked: threading.Event, release: threading.Event) -> Callable[[], None]:
    """A function that locks the user's row in a transaction, says so, and holds it until released."""

    def hold_the_user() -> None:
        with transaction.atomic():
            list(EndUser.objects.select_for_update(no_key=True).filter(pk=user_pk))
            locked.set()
            release.wait(20)

    return hold_the_user


def test_the_statement_locks_the_user_before_the_session() -> None:
    """A message opening a session locks the user's row, then its sessions: the statement takes them
    in that order too (the user's ``last_seen_at`` before the session's expiry), so the two never
    deadlock."""
    limits = _limits()
    first = _accept(limits, "Hello", "m-1").message
    long_ago = timezone.now() - timedelta(minutes=5)
    ChatSession.objects.filter(pk=first.session_id).update(
        last_activity_at=long_ago, expires_at=long_ago + timedelta(seconds=limits.ttl_seconds)
    )
    EndUser.objects.filter(pk=first.user_id).update(last_seen_at=long_ago)
    locked, release = threading.Event(), threading.Event()
    hold_the_user = _user_holder(first.user_id, locked, release)

    holder = _in_thread(hold_the_user)
    assert locked.wait(20)
    sender = _in_thread(lambda: _accept(limits, "Waiting", "m-2"))
    try:
        _until(lambda: _waiting_on_a_lock("WITH snap("), "the statement waits on the user's row")
        # Meanwhile the session's row is free: the statement has not locked it before the user's.
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                f'SELECT 1 FROM "{ChatSession._meta.db_table}" WHERE id = %s FOR NO KEY UPDATE NOWAIT',
                [first.session_id],
            )
            assert cursor.fetchone() == (1,)
    finally:
        release.set()
    holder.result(20)
    received = sender.result(20)
    assert received.created
    session = ChatSession.objects.get(pk=first.session_id)
    assert session.expires_at == received.message.session.expires_at > long_ago + timedelta(minutes=4)


def test_a_copy_another_process_is_storing_at_the_same_moment_is_the_answer() -> None:
    limits = _limits(messages_per_minute=1, burst=2)
    first = _accept(limits, "Hello", "m-1").message  # one token of two
    inserted, release = threading.Event(), threading.Event()

    def store_a_copy() -> Message:
        with transaction.atomic():
            copy = Message.objects.create(
                user_id=first.user_id,
                session_id=first.session_id,
                role="user",
                status="pending",
                content="Same moment",
                client_message_id="m-2",
            )
            inserted.set()
            release.wait(20)
        return copy

    other = _in_thread(store_a_copy)
    assert inserted.wait(20)
    sender = _in_thread(lambda: _accept(limits, "Same moment", "m-2"))
    try:
        # The statement did not see the uncommitted copy; its INSERT waits for that transaction.
        _until(lambda: _waiting_on_a_lock("WITH snap("), "the INSERT waits on the other transaction")
    finally:
        release.set()
    copy = other.result(20)
    received = sender.result(20)

    assert (received.message.pk, received.created) == (copy.pk, False)
    assert Message.objects.filter(client_message_id="m-2").count() == 1
    assert _accept(limits, "The second token", "m-3").created  # the resend's token went back
    with pytest.raises(RateLimited):
        _accept(limits, "No third", "m-4")


def test_a_statement_that_fails_stores_nothing_and_gives_its_token_back() -> None:
    limits = _limits(messages_per_minute=1, burst=2)
    first = _accept(limits, "Hello", "m-1").message  # one token of two
    EndUser.objects.filter(pk=first.user_id).update(last_seen_at=timezone.now() - timedelta(minutes=5))
    locked, release = threading.Event(), threading.Event()
    hold_the_user = _user_holder(first.user_id, locked, release)

    def send_with_a_lock_timeout() -> Received:
        with connection.cursor() as cursor:
            cursor.execute("SET lock_timeout = '300ms'")
        try:
            return _accept(limits, "Times out", "m-2")
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET lock_timeout")

    holder = _in_thread(hold_the_user)
    assert locked.wait(20)
    try:
        with pytest.raises(OperationalError, match="lock timeout"):
            _in_thread(send_with_a_lock_timeout).result(20)
    finally:
        release.set()
    holder.result(20)

    assert not Message.objects.filter(client_message_id="m-2").exists()  # the whole statement failed
    assert _accept(limits, "The second token", "m-3").created  # the failed one's token went back
    with pytest.raises(RateLimited):
        _accept(limits, "No third", "m-4")


@pytest.mark.django_db
def test_a_rest_message_in_a_live_session_is_one_statement(api_key: str) -> None:
    def post(text: str, client_id: str) -> Any:
        return Client().post(
            "/api/users/rest-alice/messages",
            json.dumps({"message": text, "client_message_id": client_id, "wait_seconds": 0}),
            content_type="application/json",
            headers={"X-API-Key": api_key},
        )

    assert post("Hello", "r-1").status_code == 202  # opens the session
    with CaptureQueriesContext(connection) as queries:
        response = post("Still there?", "r-2")
    assert response.status_code == 202
    writes = [q["sql"] for q in queries if MESSAGE_TABLE in q["sql"] and "INSERT" in q["sql"]]
    assert len(writes) == 1 and writes[0].startswith("WITH")
    assert not any(q["sql"].startswith("SAVEPOINT") for q in queries)
    stored = Message.objects.get(client_message_id="r-2")
    assert (response.json()["message_id"], stored.content) == (str(stored.pk), "Still there?")


def test_a_token_given_back_refills_the_bucket_up_to_its_burst() -> None:
    def take() -> None:
        user_message_take(user_id="give-back", per_minute=1, burst=2)

    user_message_give_back(user_id="give-back", per_minute=1, burst=2)  # a full bucket stays at 2
    take()
    take()
    with pytest.raises(RateLimited):
        take()
    user_message_give_back(user_id="give-back", per_minute=1, burst=2)
    take()
    with pytest.raises(RateLimited):
        take()
