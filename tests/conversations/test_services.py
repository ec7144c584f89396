"""Conversation services under concurrency: simultaneous messages, claims and the rate limit."""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from typing import Any

import pytest
from django.db import connections
from django.utils import timezone

from agentflow.errors import RateLimited
from conversations.models import ChatSession, EndUser, Message
from conversations.services import message_claim, message_receive

from .factories import MessageFactory, default_agent_row


def _receive(text: str, client_message_id: str | None = None, rate_per_minute: int = 0):
    return message_receive(
        agent_id=default_agent_row().pk,
        user_id="alice",
        content=text,
        client_message_id=client_message_id,
        ttl_seconds=3600,
        max_chars=4000,
        rate_per_minute=rate_per_minute,
    )


def _all_at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls on their own threads (and database connections), released together."""
    barrier = threading.Barrier(len(calls))

    def run(call: Callable[[], Any]) -> Any:
        try:
            barrier.wait(timeout=10)
            return call()
        finally:
            connections.close_all()

    with ThreadPoolExecutor(len(calls)) as pool:
        return list(pool.map(run, calls))


@pytest.mark.django_db(transaction=True)
def test_simultaneous_first_messages_share_one_session() -> None:
    results = _all_at_once([lambda i=i: _receive(f"hello {i}") for i in range(4)])

    assert [created for _, created in results] == [True] * 4
    assert EndUser.objects.count() == 1
    session = ChatSession.objects.get()
    assert {message.session_id for message, _ in results} == {session.pk}
    assert Message.objects.filter(session=session, status="pending").count() == 4


@pytest.mark.django_db(transaction=True)
def test_simultaneous_messages_after_expiry_open_one_new_session() -> None:
    first, _ = _receive("hello")
    expired_at = timezone.now() - timedelta(seconds=1)
    ChatSession.objects.update(expires_at=expired_at)

    results = _all_at_once([lambda i=i: _receive(f"again {i}") for i in range(4)])

    live = ChatSession.objects.get(status="active")
    old = ChatSession.objects.get(status="expired")
    assert old.pk == first.session_id
    assert old.ended_at == expired_at
    assert {message.session_id for message, _ in results} == {live.pk}
    assert ChatSession.objects.count() == 2


@pytest.mark.django_db
def test_a_message_slides_the_session_expiry_only_once_it_would_move_a_minute() -> None:
    first, _ = _receive("hello")
    opened = ChatSession.objects.get()
    assert opened.expires_at - opened.last_activity_at == timedelta(hours=1)

    _receive("and another thing")  # moments later: the stored expiry stands (no write)
    assert ChatSession.objects.get().expires_at == opened.expires_at

    earlier = opened.expires_at - timedelta(seconds=61)  # as if the last write was 61 s ago
    ChatSession.objects.update(expires_at=earlier, last_activity_at=earlier - timedelta(hours=1))
    before = timezone.now()
    second, _ = _receive("still there?")
    session = ChatSession.objects.get()
    assert session.pk == first.session_id == second.session_id
    assert session.last_activity_at >= before
    assert session.expires_at - session.last_activity_at == timedelta(hours=1)


@pytest.mark.django_db(transaction=True)
def test_simultaneous_sends_of_one_client_message_id_store_one_message() -> None:
    _receive("warm up")  # an existing user, so the sends race past the duplicate check into the insert

    results = _all_at_once([lambda: _receive("My login is broken", "m-1") for _ in range(4)])

    stored = Message.objects.get(client_message_id="m-1")
    assert sorted(created for _, created in results) == [False, False, False, True]
    assert {message.pk for message, _ in results} == {stored.pk}
    assert Message.objects.count() == 2


@pytest.mark.django_db
def test_same_client_message_id_of_another_user_is_a_different_message() -> None:
    alice, _ = _receive("hello", "m-1")
    bob, created = message_receive(
        agent_id=default_agent_row().pk,
        user_id="bob",
        content="hello",
        client_message_id="m-1",
        ttl_seconds=3600,
        max_chars=4000,
    )

    assert created is True
    assert bob.pk != alice.pk
    assert Message.objects.filter(client_message_id="m-1").count() == 2


@pytest.mark.django_db
def test_rate_limit_rejects_the_extra_message_and_stores_nothing() -> None:
    sent = [_receive(f"message {i}", f"m-{i}", rate_per_minute=3)[0] for i in range(3)]

    with pytest.raises(RateLimited) as raised:
        _receive("one too many", "m-3", rate_per_minute=3)

    retry = raised.value.retry_after
    assert 1 <= retry <= 20  # the bucket refills one message every 20 s
    assert str(raised.value) == f"too many messages: at most 3 at once and 3 a minute; try again in {retry} s"
    assert list(Message.objects.order_by("created_at").values_list("content", flat=True)) == [
        "message 0",
        "message 1",
        "message 2",
    ]
    # A resent client id is answered from the database: never refused, never counted.
    assert _receive("message 0", "m-0", rate_per_minute=3) == (sent[0], False)
    assert Message.objects.count() == 3


@pytest.mark.django_db
def test_a_message_is_claimed_once_until_its_claim_goes_stale() -> None:
    message = MessageFactory(status=Message.Status.PENDING)
    now = timezone.now()
    stale = timedelta(minutes=10)

    assert message_claim(message_id=message.pk, now=now, stale_after=stale) is True
    assert message_claim(message_id=message.pk, now=now + timedelta(minutes=9), stale_after=stale) is False
    assert message_claim(message_id=message.pk, now=now + timedelta(minutes=11), stale_after=stale) is True
    message.refresh_from_db()
    assert (message.status, message.processing_started_at) == ("processing", now + timedelta(minutes=11))

    Message.objects.filter(pk=message.pk).update(status=Message.Status.DONE)
    assert message_claim(message_id=message.pk, now=now + timedelta(hours=1), stale_after=stale) is False

    Message.objects.filter(pk=message.pk).update(status=Message.Status.FAILED, error="boom")
    assert message_claim(message_id=message.pk, now=now, stale_after=stale) is True
    message.refresh_from_db()
    assert (message.status, message.error) == ("processing", "")
