"""Rate limits that hold: token buckets per user, API key and IP; refused keys; WebSocket frames and
connections; revoked chat tokens and sockets closed on erase."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from agentflow.errors import RateLimited
from agentflow_project.asgi import application
from conversations.chat_tokens import chat_token_create, chat_token_revoke
from conversations.consumers import CLOSE_ERASED, CLOSE_UNAUTHORIZED
from conversations.frames import CLOSE_TOO_MANY
from conversations.models import ApiKey, AuditEvent, EndUser, Message
from conversations.ratelimit import FrameBucket, bucket_take, rate_limit_take
from conversations.services import api_key_create, message_receive
from memory.privacy import user_erase
from tests.conftest import ORIGIN
from tests.conversations.factories import default_agent_row

from .helpers import astored_counts, stored_counts, without_server_time


def _limits(settings: Any, **values: float) -> None:
    settings.AGENTFLOW = {
        **settings.AGENTFLOW,
        "RATE_LIMITS": {**settings.AGENTFLOW["RATE_LIMITS"], **values},
    }


# --- the bucket -----------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_burst_of_60_gets_exactly_the_burst_then_the_refill_rate() -> None:
    now = 1_800_000_000.0
    allowed = [bucket_take(scope="test", ident="u1", per_minute=30, burst=10, now=now)[0] for _ in range(60)]

    assert allowed.count(True) == 10
    assert allowed[:10] == [True] * 10
    # 30 a minute is one every 2 s: 1.9 s later nothing (0.1 s to wait), 2.1 s later exactly one more.
    refused = bucket_take(scope="test", ident="u1", per_minute=30, burst=10, now=now + 1.9)
    assert refused == (False, pytest.approx(0.1, abs=1e-3))
    assert bucket_take(scope="test", ident="u1", per_minute=30, burst=10, now=now + 2.1)[0] is True
    assert bucket_take(scope="test", ident="u1", per_minute=30, burst=10, now=now + 2.1)[0] is False
    # A full minute later the bucket holds its burst again, never more.
    later = [
        bucket_take(scope="test", ident="u1", per_minute=30, burst=10, now=now + 600)[0] for _ in range(20)
    ]
    assert later.count(True) == 10
    # Another identity has its own bucket.
    assert bucket_take(scope="test", ident="u2", per_minute=30, burst=10, now=now)[0] is True


@pytest.mark.django_db
def test_a_look_writes_nothing_and_agrees_with_later_takes() -> None:
    """``cost=0`` (the refused-key check before every API call): no bucket for a newcomer, no write."""
    import redis
    from django.conf import settings as django_settings

    from conversations.ratelimit import _key

    client = redis.Redis.from_url(django_settings.REDIS_URL)
    now = 1_000_000.0
    assert bucket_take(scope="test", ident="look-1", per_minute=60, burst=2, now=now, cost=0) == (True, 0.0)
    assert not client.exists(_key("test", "look-1"))

    for _ in range(2):
        bucket_take(scope="test", ident="look-1", per_minute=60, burst=2, now=now)
    stored = client.hgetall(_key("test", "look-1"))
    allowed, wait = bucket_take(scope="test", ident="look-1", per_minute=60, burst=2, now=now + 0.5, cost=0)

    assert (allowed, round(wait, 3)) == (False, 0.5)  # empty: half a token refilled, half to go
    assert client.hgetall(_key("test", "look-1")) == stored
    assert bucket_take(scope="test", ident="look-1", per_minute=60, burst=2, now=now + 1.0)[0] is True
    assert bucket_take(scope="test", ident="look-1", per_minute=60, burst=2, now=now + 1.0)[0] is False
    client.close()


def test_the_refused_request_says_when_to_retry() -> None:
    now = 1_800_000_000.0
    rate_limit_take(scope="test", ident="r", per_minute=6, burst=1, what="calls", now=now)

    with pytest.raises(RateLimited) as raised:
        rate_limit_take(scope="test", ident="r", per_minute=6, burst=1, what="calls", now=now + 2.5)

    assert raised.value.retry_after == 8  # one every 10 s: 7.5 s to go, rounded up
    assert str(raised.value) == "too many calls: at most 1 at once and 6 a minute; try again in 8 s"


def test_frame_bucket_counts_overflow_until_a_frame_gets_through() -> None:
    bucket = FrameBucket(per_second=2, burst=3)
    start = bucket.stamp

    assert [bucket.take(start) for _ in range(5)] == [True, True, True, False, False]
    assert bucket.overflow == 2
    assert bucket.retry_after() == 0.5
    assert bucket.take(start + 0.5) is True  # one frame refilled
    assert bucket.overflow == 0


@pytest.mark.django_db
def test_60_messages_at_once_store_exactly_the_burst() -> None:
    results = []
    for i in range(60):
        try:
            message_receive(
                agent_id=default_agent_row().pk,
                user_id="flood",
                content=f"message {i}",
                ttl_seconds=3600,
                max_chars=4000,
                rate_per_minute=1,  # one more a minute: the loop ends long before
                rate_burst=5,
            )
        except RateLimited:
            results.append(False)
        else:
            results.append(True)

    assert results == [True] * 5 + [False] * 55
    assert list(Message.objects.order_by("created_at").values_list("content", flat=True)) == [
        f"message {i}" for i in range(5)
    ]


# --- REST: per API key, per IP, refused keys ------------------------------------------------------


def _token_call(key: str, user: str = "alice", ip: str = "127.0.0.1"):
    return Client(REMOTE_ADDR=ip).post(f"/api/users/{user}/chat-token", headers={"X-API-Key": key})


@pytest.mark.django_db
def test_an_api_key_over_its_bucket_gets_429_with_retry_after(api_key: str, settings) -> None:
    _limits(settings, API_KEY_PER_MINUTE=1, API_KEY_BURST=3)
    _, other_key = api_key_create(name="other backend")

    statuses = [_token_call(api_key).status_code for _ in range(3)]
    refused = _token_call(api_key)

    assert statuses == [200, 200, 200]
    assert refused.status_code == 429
    retry = int(refused["Retry-After"])
    assert 1 <= retry <= 60
    assert refused.json() == {
        "error": {
            "code": "rate_limited",
            "message": f"too many API calls for this key: at most 3 at once and 1 a minute; try again in {retry} s",
        }
    }
    assert AuditEvent.objects.filter(action=AuditEvent.Action.API_CALL).count() == 3  # the refused one: none
    assert _token_call(other_key).status_code == 200  # another key has its own bucket


@pytest.mark.django_db
def test_one_address_over_its_bucket_gets_429_whatever_the_key(api_key: str, settings) -> None:
    _limits(settings, IP_PER_MINUTE=1, IP_BURST=2)
    _, other_key = api_key_create(name="other backend")

    statuses = [_token_call(key, ip="10.0.0.7").status_code for key in (api_key, other_key, other_key)]

    assert statuses == [200, 200, 429]
    assert _token_call(other_key, ip="10.0.0.8").status_code == 200


@pytest.mark.django_db
def test_wrong_api_keys_are_throttled_per_address_and_recorded(api_key: str, settings) -> None:
    _limits(settings, AUTH_FAILURES_PER_MINUTE=1, AUTH_FAILURES_BURST=3)
    before = stored_counts()

    guesses = [_token_call(f"afk_guess-{i}", ip="10.0.0.9").status_code for i in range(3)]
    blocked = _token_call(api_key, ip="10.0.0.9")  # even the right key: this address is guessing

    assert guesses == [401, 401, 401]
    assert blocked.status_code == 429
    assert blocked.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(blocked["Retry-After"]) <= 60
    assert (
        list(AuditEvent.objects.values_list("action", "ip"))
        == [(AuditEvent.Action.API_AUTH_FAILED, "10.0.0.9")] * 3
    )
    assert ApiKey.objects.get(prefix=api_key[:12]).last_used_at is None  # the key was never checked
    assert stored_counts() == before
    assert _token_call(api_key, ip="10.0.0.10").status_code == 200  # other addresses are not affected


# --- WebSocket: frames, connections, revoked tokens, erase ----------------------------------------


async def _open(token: str) -> tuple[WebsocketCommunicator, dict]:
    communicator = WebsocketCommunicator(application, f"/ws/chat/?token={token}", headers=[ORIGIN])
    connected, _ = await communicator.connect()
    assert connected
    return communicator, without_server_time(await communicator.receive_json_from())


@pytest.mark.django_db(transaction=True)
async def test_a_frame_flood_gets_error_frames_then_a_close_4429(settings) -> None:
    # Almost no refill: the count does not depend on how fast the test runs.
    _limits(settings, WS_FRAMES_PER_SECOND=0.001, WS_FRAME_BURST=3, WS_FRAME_OVERFLOW_CLOSE=3)
    communicator, ready = await _open(await sync_to_async(chat_token_create)(external_id="alice"))
    assert ready["type"] == "ready"

    for _ in range(3):
        await communicator.send_json_to({"type": "ping"})
        assert await communicator.receive_json_from() == {"type": "pong"}
    replies = []
    for frame in ({"type": "ping"}, {"type": "resume", "after": None}, {"type": "typing", "state": True}):
        await communicator.send_json_to(frame)
        replies.append(await communicator.receive_json_from())

    assert [r["code"] for r in replies] == ["rate_limited", "rate_limited", "too_many_frames"]
    assert replies[0]["message"] == "too many frames; this one was dropped"
    assert replies[0]["retry_after"] > 0
    assert await communicator.receive_output() == {"type": "websocket.close", "code": CLOSE_TOO_MANY}


@pytest.mark.django_db(transaction=True)
async def test_too_many_connections_for_one_user_are_refused_4429(settings) -> None:
    _limits(settings, WS_CONNECTIONS_PER_USER=2)
    token = await sync_to_async(chat_token_create)(external_id="alice")
    first, _ = await _open(token)
    second, _ = await _open(token)

    third, error = await _open(token)

    assert error == {
        "type": "error",
        "code": "too_many_connections",
        "message": "at most 2 open connections per user",
    }
    assert await third.receive_output() == {"type": "websocket.close", "code": CLOSE_TOO_MANY}
    # Another user is not affected; a closed connection frees its place.
    other, ready = await _open(await sync_to_async(chat_token_create)(external_id="bob"))
    assert ready["type"] == "ready"
    await first.disconnect()
    fourth, ready = await _open(token)
    assert ready["type"] == "ready"
    for communicator in (second, other, fourth):
        await communicator.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_revoked_token_is_refused_4401_and_a_newer_one_connects() -> None:
    old = await sync_to_async(chat_token_create)(external_id="alice")
    await sync_to_async(chat_token_revoke)(external_id="alice")
    await asyncio.sleep(0.01)  # a token issued after the revocation (clock resolution)
    new = await sync_to_async(chat_token_create)(external_id="alice")

    refused, error = await _open(old)
    assert error == {"type": "error", "code": "token_revoked", "message": "this chat token was revoked"}
    assert await refused.receive_output() == {"type": "websocket.close", "code": CLOSE_UNAUTHORIZED}
    assert await EndUser.objects.acount() == 0  # a refused connection registers no one

    accepted, ready = await _open(new)
    assert ready["type"] == "ready"
    await accepted.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_erase_closes_the_users_open_socket_4410_and_its_token_stops_working() -> None:
    token = await sync_to_async(chat_token_create)(external_id="alice")
    communicator, _ = await _open(token)
    bystander, _ = await _open(await sync_to_async(chat_token_create)(external_id="bob"))
    alice = await EndUser.objects.aget(external_id="alice")

    await sync_to_async(user_erase)(user=alice)

    assert await communicator.receive_json_from() == {
        "type": "error",
        "code": "user_erased",
        "message": "this user's data was erased; the conversation is closed",
    }
    assert await communicator.receive_output() == {"type": "websocket.close", "code": CLOSE_ERASED}
    again, error = await _open(token)
    assert error["code"] == "token_revoked"
    assert await again.receive_output() == {"type": "websocket.close", "code": CLOSE_UNAUTHORIZED}
    assert await bystander.receive_nothing(timeout=0.2)  # bob's socket is untouched
    assert await EndUser.objects.filter(external_id="alice").aexists() is False
    await bystander.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_a_message_on_a_socket_still_open_after_erase_never_recreates_the_user() -> None:
    communicator, _ = await _open(await sync_to_async(chat_token_create)(external_id="alice"))
    # The erase as the database and Redis see it, with the close message to the socket lost.
    await sync_to_async(chat_token_revoke)(external_id="alice")
    await EndUser.objects.filter(external_id="alice").adelete()

    await communicator.send_json_to(
        {"type": "message", "message": "Are you there?", "client_message_id": "c-1"}
    )

    assert (await communicator.receive_json_from())["code"] == "user_erased"
    assert await communicator.receive_output() == {"type": "websocket.close", "code": CLOSE_ERASED}
    assert await astored_counts() == {"users": 0, "sessions": 0, "threads": 0, "messages": 0}
