"""The REST wait on a message's own "turn settled" signal (conversations.turn_results), streams that go
only to listeners that exist (conversations.events), and the beat's housekeeping that no turn does any
more (conversations.housekeeping)."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta
from typing import Any

import pytest
import redis
from channels.layers import get_channel_layer
from django.conf import settings as django_settings
from django.test import AsyncClient
from django.utils import timezone

import conversations.api
from agentflow.testing.fake_anthropic import FakeReply
from conversations import turn_results
from conversations.events import DeltaStream, apublish_listened, listeners_exist, user_group
from conversations.housekeeping import housekeeping_run
from conversations.models import Agent, ChatSession, Message, Thread, ThreadActivity
from conversations.turn_results import RESULT_TTL, result_key, turn_settled, turn_settled_wait
from tests.conversations.factories import ChatSessionFactory, EndUserFactory, ThreadFactory
from tests.conversations.helpers import turn_settled as settled
from tests.faults import dead_redis_url


def _redis() -> redis.Redis:
    return redis.Redis.from_url(django_settings.REDIS_URL)


def _post(client: AsyncClient, api_key: str, **body: Any) -> Any:
    return client.post(
        "/api/users/alice/messages",
        {"message": "My login is broken", **body},
        content_type="application/json",
        headers={"X-API-Key": api_key},
    )


# --- the signal ------------------------------------------------------------------------------------


def test_the_signal_key_is_the_caches_key_and_follows_a_change_of_its_settings() -> None:
    from django.core.cache import cache
    from django.test import override_settings

    assert result_key("m-1") == cache.make_key("turn-settled:m-1")
    other = {"default": {**django_settings.CACHES["default"], "KEY_PREFIX": "elsewhere"}}
    with override_settings(CACHES=other):
        assert result_key("m-1") == cache.make_key("turn-settled:m-1")
        assert result_key("m-1").startswith("elsewhere:")
    assert not result_key("m-1").startswith("elsewhere:")


def test_a_settled_turn_leaves_a_signal_that_expires() -> None:
    key = result_key("m-expiry")
    _redis().delete(key)

    turn_settled(message_id="m-expiry", status="done")

    assert _redis().lrange(key, 0, -1) == [b"done"]
    assert 0 < _redis().ttl(key) <= RESULT_TTL
    _redis().delete(key)


async def test_a_wait_that_starts_after_the_turn_settled_returns_at_once_and_leaves_the_signal() -> None:
    key = result_key("m-early")
    _redis().delete(key)
    turn_settled(message_id="m-early", status="failed")

    started = time.monotonic()
    first = await turn_settled_wait(message_id="m-early", seconds=5)
    second = await turn_settled_wait(message_id="m-early", seconds=5)  # another request on the message

    assert (first, second) == ("failed", "failed")
    assert time.monotonic() - started < 1
    assert 0 < _redis().ttl(key) <= RESULT_TTL
    _redis().delete(key)


async def test_a_wait_with_no_signal_times_out() -> None:
    _redis().delete(result_key("m-never"))

    started = time.monotonic()
    status = await turn_settled_wait(message_id="m-never", seconds=0.3)

    assert status is None
    assert 0.25 < time.monotonic() - started < 3


async def test_a_wait_longer_than_redis_pys_default_socket_timeout_still_gets_the_signal() -> None:
    # redis-py's sockets time out after 5 s unless told otherwise: a BLPOP of a turn that took 6 s
    # ended in a TimeoutError and the request answered 202 (found by bench/production_load.py).
    key = result_key("m-slow")
    _redis().delete(key)

    async def settle_later() -> None:
        await asyncio.sleep(6)
        await asyncio.to_thread(turn_settled, message_id="m-slow", status="done")

    settler = asyncio.create_task(settle_later())
    status = await turn_settled_wait(message_id="m-slow", seconds=30)
    await settler

    assert status == "done"
    _redis().delete(key)


async def test_more_waits_at_once_than_redis_pys_default_pool_all_get_their_signal() -> None:
    # Each waiting request holds one connection (its BLPOP); redis-py 8's pools stop at 100, so the
    # 101st wait failed with "Too many connections" and its request answered 202.
    ids = [f"m-many-{i}" for i in range(130)]
    _redis().delete(*(result_key(i) for i in ids))
    waits = [asyncio.create_task(turn_settled_wait(message_id=i, seconds=30)) for i in ids]
    await asyncio.sleep(0.5)  # every wait is blocked on its pop

    for i in ids:
        await asyncio.to_thread(turn_settled, message_id=i, status="done")
    statuses = await asyncio.gather(*waits, return_exceptions=True)

    assert statuses == ["done"] * len(ids)
    _redis().delete(*(result_key(i) for i in ids))


def test_the_cache_pool_every_request_thread_shares_lends_more_than_100_connections() -> None:
    from django.core.cache import cache

    pool = cache._cache.get_client(write=True).connection_pool  # type: ignore[attr-defined]
    held = [pool.get_connection() for _ in range(130)]
    try:
        assert len({id(c) for c in held}) == 130
    finally:
        for connection in held:
            pool.release(connection)


# --- the REST view ---------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
async def test_a_worker_that_finishes_after_the_wait_timed_out(celery_worker, api_key, fake_llm) -> None:
    fake_llm.enqueue(FakeReply(text="Sorry for the wait.", delay=2.5))
    client = AsyncClient()

    early = await _post(client, api_key, client_message_id="late-1", wait_seconds=0.5)

    assert early.status_code == 202, early.content
    body = early.json()
    assert (body["status"], body["content"]) in {("pending", None), ("processing", None)}
    await settled(body["message_id"])
    assert _redis().lrange(result_key(body["message_id"]), 0, -1) == [b"done"]  # nobody took it
    assert 0 < _redis().ttl(result_key(body["message_id"])) <= RESULT_TTL

    again = await _post(client, api_key, client_message_id="late-1", wait_seconds=5)  # the resend

    assert again.status_code == 200, again.content
    assert (again.json()["message_id"], again.json()["content"]) == (
        body["message_id"],
        "Sorry for the wait.",
    )
    assert await Message.objects.filter(role="assistant").acount() == 1


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
async def test_the_wait_returns_the_reply_as_soon_as_the_worker_stores_it(
    celery_worker, api_key, fake_llm
) -> None:
    fake_llm.enqueue(FakeReply(text="Here you go.", delay=0.3))

    started = time.monotonic()
    response = await _post(AsyncClient(), api_key, wait_seconds=30)

    assert response.status_code == 200, response.content
    assert (response.json()["status"], response.json()["content"]) == ("done", "Here you go.")
    assert time.monotonic() - started < 10  # woken by the signal, not by the 30 s timeout


@pytest.mark.django_db
def test_post_while_the_wait_cannot_reach_redis_answers_202(
    api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    queued: list[Any] = []
    monkeypatch.setattr(conversations.api, "queue_turn", lambda message_id, **hint: queued.append(message_id))
    monkeypatch.setattr(turn_results, "_async_redis", lambda: redis.asyncio.Redis.from_url(dead_redis_url()))
    from django.test import Client

    response = Client().post(
        "/api/users/alice/messages",
        {"message": "hello", "wait_seconds": 5},
        content_type="application/json",
        headers={"X-API-Key": api_key},
    )

    assert response.status_code == 202
    message = Message.objects.get()
    assert (response.json()["message_id"], response.json()["status"]) == (str(message.pk), "pending")
    assert queued == [message.pk]


# --- housekeeping ----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_housekeeping_marks_expired_sessions_and_idle_threads_of_users_who_never_came_back() -> None:
    now = timezone.now()
    patient = Agent.objects.create(
        name="patient", config={"session_config": {"thread_inactivity_threshold": 120}}
    )
    alice, bob = EndUserFactory(external_id="alice"), EndUserFactory(external_id="bob", agent=patient)
    gone = ChatSession.objects.create(
        user=alice,
        ttl_seconds=60,
        last_activity_at=now - timedelta(hours=2),
        expires_at=now - timedelta(hours=1),
    )
    live = ChatSession.objects.create(
        user=alice, ttl_seconds=3600, last_activity_at=now, expires_at=now + timedelta(hours=1)
    )
    idle = ThreadFactory(session=gone, last_activity_at=now - timedelta(minutes=45))
    fresh = ThreadFactory(session=live, last_activity_at=now - timedelta(minutes=5))
    bobs = ThreadFactory(
        session=ChatSessionFactory(user=bob), last_activity_at=now - timedelta(minutes=45)
    )  # his agent waits 2 h

    counts = housekeeping_run()

    assert counts == {"sessions_expired": 1, "threads_dormant": 1}
    gone.refresh_from_db()
    assert (gone.status, gone.ended_at) == ("expired", gone.expires_at)
    assert ChatSession.objects.get(pk=live.pk).status == "active"
    statuses = dict(Thread.objects.values_list("pk", "status"))
    assert (statuses[idle.pk], statuses[fresh.pk], statuses[bobs.pk]) == ("dormant", "open", "open")
    assert list(ThreadActivity.objects.values_list("thread_id", "kind")) == [(idle.pk, "dormant")]
    assert housekeeping_run() == {"sessions_expired": 0, "threads_dormant": 0}  # nothing twice


# --- streams go only to listeners that exist -------------------------------------------------------


async def _drain(layer: Any, channel: str, seconds: float) -> list[dict[str, Any]]:
    received = []
    try:
        while True:
            received.append(await asyncio.wait_for(layer.receive(channel), seconds))
    except TimeoutError:
        return received


async def test_a_reply_is_streamed_to_a_listening_socket() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(user_group(9_000_001), channel)
    try:
        assert await listeners_exist(user_pk=9_000_001)
        stream = DeltaStream(user_pk=9_000_001, message_id="m-1", interval=0)
        await stream("Your order ")
        await stream("ships today.")
        await stream.close()

        events = [e["event"] for e in await _drain(layer, channel, 0.5)]
    finally:
        await layer.group_discard(user_group(9_000_001), channel)

    assert [(e["kind"], e["text"]) for e in events] == [("delta", "Your order "), ("delta", "ships today.")]


async def test_a_reply_nobody_listens_to_is_not_streamed() -> None:
    layer = get_channel_layer()
    assert not await listeners_exist(user_pk=9_000_002)
    stream = DeltaStream(user_pk=9_000_002, message_id="m-2", interval=0)
    await stream("Your order ")  # nobody listens: not sent, and the stream stops asking
    channel = await layer.new_channel()
    await layer.group_add(user_group(9_000_002), channel)  # a socket opens mid-reply
    try:
        await stream("ships today.")
        await stream.close()

        events = await _drain(layer, channel, 0.5)
    finally:
        await layer.group_discard(user_group(9_000_002), channel)

    assert events == []  # it gets the whole reply with the turn event instead


async def test_the_typing_event_tells_whether_anyone_listens() -> None:
    # A turn's first event (typing) is sent and answers "does anyone listen?" in the same go.
    layer = get_channel_layer()
    typing = {"kind": "typing", "role": "assistant", "state": True, "message_id": "m-3"}
    assert await apublish_listened(user_pk=9_000_003, event=typing) is False
    channel = await layer.new_channel()
    await layer.group_add(user_group(9_000_003), channel)
    try:
        assert await apublish_listened(user_pk=9_000_003, event=typing) is True
        events = [e["event"] for e in await _drain(layer, channel, 0.5)]
    finally:
        await layer.group_discard(user_group(9_000_003), channel)
    assert events == [typing]


@pytest.mark.parametrize("blocking", [False, True])
async def test_a_channel_layer_that_fails_counts_as_listened(settings: Any, blocking: bool) -> None:
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "agentflow.channel_layer.RedisChannelLayer",
            "CONFIG": {"hosts": [dead_redis_url()]},
        }
    }
    assert await apublish_listened(user_pk=9_000_004, event={"kind": "typing"}, blocking=blocking) is True


async def test_a_blocking_send_on_a_layer_without_a_blocking_client_goes_through_its_group_send(
    settings: Any,
) -> None:
    settings.CHANNEL_LAYERS = {"default": {"BACKEND": "channels.layers.InMemoryChannelLayer"}}
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(user_group(9_000_005), channel)
    stream = DeltaStream(user_pk=9_000_005, message_id="m-5", interval=0, listened=True, blocking=True)

    await stream("Hello")
    await stream.close()

    message = await asyncio.wait_for(layer.receive(channel), 5)
    assert message["event"] == {"kind": "delta", "message_id": "m-5", "seq": 0, "text": "Hello"}
