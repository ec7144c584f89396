"""The WebSocket chat protocol on channels-redis: authentication, bad frames, turns, isolation."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.core import signing
from django.test import Client

from agentflow.testing.fake_anthropic import FakeReply
from agentflow_project.asgi import application
from conversations.chat_tokens import CHAT_TOKEN_SALT
from conversations.consumers import CLOSE_UNAUTHORIZED
from conversations.frames import MAX_FRAME_BYTES
from conversations.models import ChatSession, EndUser, Message, Thread
from tests.conftest import ORIGIN

from .helpers import astored_counts, receive_until, use_up_rate_limit, without_server_time

pytestmark = pytest.mark.django_db(transaction=True)

TURN_TIMEOUT = 20


def _token(user_id: str) -> str:
    return signing.dumps({"u": user_id}, salt=CHAT_TOKEN_SALT, compress=True)


def _communicator(query: str, *, origin: bool = True) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, f"/ws/chat/{query}", headers=[ORIGIN] if origin else [])


async def _connect(user_id: str) -> WebsocketCommunicator:
    communicator = _communicator(f"?token={_token(user_id)}")
    connected, _ = await communicator.connect()
    assert connected
    ready = without_server_time(await communicator.receive_json_from())
    assert ready == {"type": "ready", "user_id": user_id, "protocol": 1, "agent": "agentflow"}
    return communicator


class _ExpiredSigner(signing.TimestampSigner):
    """Signs as if two hours ago: a genuine token, past the one-hour chat-token lifetime."""

    def timestamp(self) -> str:
        return signing.b62_encode(int(time.time()) - 7200)


# --- connecting -------------------------------------------------------------------------------


async def test_sockets_connecting_together_do_their_database_steps_side_by_side(monkeypatch) -> None:
    # Each connect waits inside its database step until the other is inside its own: on channels'
    # one thread-sensitive thread the first would wait alone, and its handshake would never finish.
    import threading

    import conversations.consumers

    barrier = threading.Barrier(2, timeout=30)
    real = conversations.consumers.agent_settings

    def agent_settings_together(**kwargs):
        barrier.wait()
        return real(**kwargs)

    monkeypatch.setattr(conversations.consumers, "agent_settings", agent_settings_together)

    first, second = await asyncio.gather(_connect("side-1"), _connect("side-2"))

    await first.disconnect()
    await second.disconnect()


@pytest.mark.parametrize(
    "query",
    [
        "",
        "?token=",
        "?token=garbage",
        f"?token={signing.dumps({'u': 'alice'}, salt='another-salt', compress=True)}",
        f"?token={signing.dumps({'u': 'alice'}, key='not-our-secret', salt=CHAT_TOKEN_SALT, compress=True)}",
        f"?token={_ExpiredSigner(salt=CHAT_TOKEN_SALT).sign_object({'u': 'alice'}, compress=True)}",
        f"?token={signing.dumps(['alice'], salt=CHAT_TOKEN_SALT)}",
        f"?token={signing.dumps({'u': 7}, salt=CHAT_TOKEN_SALT)}",
    ],
    ids=[
        "no-token",
        "empty",
        "garbage",
        "other-salt",
        "other-key",
        "expired",
        "not-a-dict",
        "user-not-a-string",
    ],
)
async def test_connection_without_a_valid_token_is_closed_4401(query: str) -> None:
    communicator = _communicator(query)

    connected, _ = await communicator.connect()

    assert connected is True  # accepted so that the close code reaches the client
    assert await communicator.receive_json_from() == {
        "type": "error",
        "code": "unauthorized",
        "message": "the chat token is missing, invalid or expired",
    }
    assert await communicator.receive_output() == {"type": "websocket.close", "code": CLOSE_UNAUTHORIZED}
    assert await astored_counts() == {"users": 0, "sessions": 0, "threads": 0, "messages": 0}
    await communicator.disconnect()


@pytest.mark.parametrize(
    "origin",
    [b"http://evil.example", b"https://localhost.evil.example", b"null", b"file://", b"ftp://localhost"],
)
async def test_a_page_from_a_foreign_origin_is_refused_with_4403(origin: bytes) -> None:
    communicator = WebsocketCommunicator(
        application, f"/ws/chat/?token={_token('alice')}", headers=[(b"origin", origin)]
    )

    connected, _ = await communicator.connect()

    assert connected is True  # accepted so that the close code reaches the page
    assert await communicator.receive_json_from() == {
        "type": "error",
        "code": "origin_not_allowed",
        "message": "this page's origin may not open the chat; see AGENTFLOW_WIDGET_ORIGINS",
    }
    assert await communicator.receive_output() == {"type": "websocket.close", "code": 4403}
    assert await astored_counts() == {"users": 0, "sessions": 0, "threads": 0, "messages": 0}
    await communicator.disconnect()


async def test_a_widget_origin_from_settings_may_open_the_chat(settings) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "WIDGET_ORIGINS": ["https://shop.example.com"]}
    allowed = WebsocketCommunicator(
        application, f"/ws/chat/?token={_token('alice')}", headers=[(b"origin", b"https://shop.example.com")]
    )
    other_port = WebsocketCommunicator(
        application,
        f"/ws/chat/?token={_token('alice')}",
        headers=[(b"origin", b"https://shop.example.com:8443")],
    )

    assert (await allowed.connect())[0] is True
    assert (await allowed.receive_json_from())["type"] == "ready"
    assert (await other_port.connect())[0] is True
    assert (await other_port.receive_json_from())["code"] == "origin_not_allowed"
    for communicator in (allowed, other_port):
        await communicator.disconnect()


async def test_a_program_without_an_origin_header_is_let_in_by_its_token() -> None:
    communicator = _communicator(f"?token={_token('alice')}", origin=False)

    connected, _ = await communicator.connect()

    assert connected is True
    assert without_server_time(await communicator.receive_json_from()) == {
        "type": "ready",
        "user_id": "alice",
        "protocol": 1,
        "agent": "agentflow",
    }
    await communicator.disconnect()


async def test_an_unsupported_protocol_version_is_closed_4400() -> None:
    communicator = _communicator(f"?token={_token('alice')}&v=2")

    assert (await communicator.connect())[0] is True
    assert await communicator.receive_json_from() == {
        "type": "error",
        "code": "unsupported_version",
        "message": "protocol version '2' is not supported; this server speaks 1",
    }
    assert await communicator.receive_output() == {"type": "websocket.close", "code": 4400}
    assert await EndUser.objects.acount() == 0
    await communicator.disconnect()


async def test_token_from_the_rest_api_opens_the_chat(api_key: str) -> None:
    response = await sync_to_async(Client().post)(
        "/api/users/alice/chat-token", headers={"X-API-Key": api_key}
    )
    token = response.json()["token"]
    communicator = _communicator(f"?token={token}")

    connected, _ = await communicator.connect()

    assert connected
    ready = without_server_time(await communicator.receive_json_from())
    assert ready == {"type": "ready", "user_id": "alice", "protocol": 1, "agent": "agentflow"}
    await communicator.send_json_to({"type": "ping"})
    assert await communicator.receive_json_from() == {"type": "pong"}
    assert [u.external_id async for u in EndUser.objects.all()] == ["alice"]
    await communicator.disconnect()


# --- bad frames: an error frame, the connection stays open, nothing stored ----------------------


async def test_bad_frames_get_error_frames_and_the_connection_stays_open(settings) -> None:
    # More bad frames than the default frame burst (test_ratelimit.py covers that limit).
    settings.AGENTFLOW = {
        **settings.AGENTFLOW,
        "RATE_LIMITS": {**settings.AGENTFLOW["RATE_LIMITS"], "WS_FRAME_BURST": 100},
    }
    communicator = await _connect("alice")
    frames: list[tuple[dict, dict]] = [
        (
            {"text_data": "{not json"},
            {"type": "error", "code": "bad_json", "message": "the frame is not valid JSON"},
        ),
        (
            {"text_data": "[1, 2]"},
            {"type": "error", "code": "bad_frame", "message": "a frame must be a JSON object with a 'type'"},
        ),
        (
            {"text_data": '"message"'},
            {"type": "error", "code": "bad_frame", "message": "a frame must be a JSON object with a 'type'"},
        ),
        (
            {"bytes_data": b'{"type": "ping"}'},
            {"type": "error", "code": "bad_frame", "message": "send JSON text frames"},
        ),
        (
            {"text_data": json.dumps({"type": "shout"})},
            {
                "type": "error",
                "code": "unknown_type",
                "message": "unknown frame type 'shout'; expected one of: message, typing, ack, resume, ping",
            },
        ),
        (
            {"text_data": json.dumps({"message": "no type"})},
            {
                "type": "error",
                "code": "unknown_type",
                "message": "unknown frame type None; expected one of: message, typing, ack, resume, ping",
            },
        ),
        (
            {"text_data": json.dumps({"type": "message", "message": "x" * MAX_FRAME_BYTES})},
            {
                "type": "error",
                "code": "frame_too_large",
                "message": f"frames are limited to {MAX_FRAME_BYTES} bytes",
            },
        ),
        (
            {"text_data": json.dumps({"type": "message", "message": "", "client_message_id": "c-1"})},
            {
                "type": "error",
                "code": "invalid_input",
                "message": "message must not be empty",
                "field": "message",
                "client_message_id": "c-1",
            },
        ),
        (
            {"text_data": json.dumps({"type": "typing", "state": "yes"})},
            {
                "type": "error",
                "code": "bad_frame",
                "message": "'state' must be true or false",
                "field": "state",
            },
        ),
        (
            {"text_data": json.dumps({"type": "ack"})},
            {
                "type": "error",
                "code": "bad_frame",
                "message": "'message_id' must be a message id",
                "field": "message_id",
            },
        ),
        (
            {"text_data": json.dumps({"type": "ack", "message_id": "not-a-uuid"})},
            {
                "type": "error",
                "code": "not_found",
                "message": "message 'not-a-uuid' not found",
                "field": "message_id",
            },
        ),
        (
            {"text_data": json.dumps({"type": "resume", "after": 42})},
            {
                "type": "error",
                "code": "bad_frame",
                "message": "'after' must be a message id or null",
                "field": "after",
            },
        ),
        (
            {"text_data": json.dumps({"type": "resume", "after": "00000000-0000-0000-0000-000000000000"})},
            {
                "type": "error",
                "code": "not_found",
                "field": "after",
                "message": "message 00000000-0000-0000-0000-000000000000 not found for this user",
            },
        ),
        (
            {"text_data": json.dumps({"type": "message", "message": " \n "})},
            {
                "type": "error",
                "code": "invalid_input",
                "message": "message must not be empty",
                "field": "message",
                "client_message_id": None,
            },
        ),
        (
            {"text_data": json.dumps({"type": "message"})},
            {
                "type": "error",
                "code": "invalid_input",
                "message": "message must be a string; got NoneType",
                "field": "message",
                "client_message_id": None,
            },
        ),
        (
            {"text_data": json.dumps({"type": "message", "message": 123})},
            {
                "type": "error",
                "code": "invalid_input",
                "message": "message must be a string; got int",
                "field": "message",
                "client_message_id": None,
            },
        ),
        (
            {"text_data": json.dumps({"type": "message", "message": "x" * 4001})},
            {
                "type": "error",
                "code": "invalid_input",
                "message": "message is 4001 characters; the limit is 4000 (input_config.max_message_chars)",
                "field": "message",
                "client_message_id": None,
            },
        ),
        (
            {"text_data": json.dumps({"type": "message", "message": "hi", "client_message_id": "bad id!"})},
            {
                "type": "error",
                "code": "invalid_input",
                "message": "client_message_id must be 1-100 letters, digits or '_.:-' characters",
                "field": "client_message_id",
                "client_message_id": "bad id!",
            },
        ),
    ]

    for frame, expected in frames:
        await communicator.send_to(**frame)
        assert await communicator.receive_json_from() == expected, frame
        await communicator.send_json_to({"type": "ping"})
        assert await communicator.receive_json_from() == {"type": "pong"}, f"closed after {frame}"

    assert await communicator.receive_nothing(timeout=0.2)
    # Connecting registered the end user; no bad frame stored anything else.
    assert await astored_counts() == {"users": 1, "sessions": 0, "threads": 0, "messages": 0}
    await communicator.disconnect()


async def test_rate_limited_message_gets_an_error_frame_and_stores_nothing(monkeypatch) -> None:
    monkeypatch.setenv("AGENT_RATE_LIMIT_MESSAGES_PER_MINUTE", "2")  # read when the agent is built
    communicator = await _connect("alice")
    await sync_to_async(use_up_rate_limit)("alice", 2)

    await communicator.send_json_to(
        {"type": "message", "message": "My login is broken", "client_message_id": "c-9"}
    )
    error = await communicator.receive_json_from()

    retry = error.pop("retry_after")
    assert 1 <= retry <= 30  # one message every 30 s
    assert error == {
        "type": "error",
        "code": "rate_limited",
        "message": f"too many messages: at most 10 at once and 2 a minute; try again in {retry} s",
        "client_message_id": "c-9",
    }
    await communicator.send_json_to({"type": "ping"})
    assert await communicator.receive_json_from() == {"type": "pong"}
    assert await astored_counts() == {"users": 1, "sessions": 0, "threads": 0, "messages": 0}
    await communicator.disconnect()


# --- turns through the Celery worker ----------------------------------------------------------


@pytest.mark.integration
async def test_a_message_is_acked_then_its_turn_arrives_and_is_stored(celery_worker, fake_llm) -> None:
    fake_llm.enqueue(FakeReply(text="Reset your password from the sign-in page."))
    communicator = await _connect("alice")

    await communicator.send_json_to(
        {"type": "message", "message": "My login is broken", "client_message_id": "c-1"}
    )
    ack = await communicator.receive_json_from()
    turn, before = await receive_until(communicator, "turn", timeout=TURN_TIMEOUT)
    typing_off = await communicator.receive_json_from(timeout=TURN_TIMEOUT)

    message = await Message.objects.aget(role="user")
    reply = await Message.objects.aget(role="assistant")
    thread = await Thread.objects.aget()
    session = await ChatSession.objects.aget()
    # The protocol's sequence for one turn (docs/protocol.md, "A turn on the wire").
    deltas = [f for f in before if f["type"] == "delta"]
    assert [f["type"] for f in before if f["type"] != "delta"] == ["user_message", "typing", "thread"]
    assert before[0]["id"] == str(message.pk) and before[0]["client_message_id"] == "c-1"
    assert before[1] == {"type": "typing", "role": "assistant", "state": True, "message_id": str(message.pk)}
    assert before[-1] == {
        "type": "thread",
        "event": "NEW_TOPIC",
        "thread_id": str(thread.pk),
        "status": "open",
        "topic": "My login is broken",
    }
    assert [d["seq"] for d in deltas] == list(range(len(deltas))) and len(deltas) >= 1
    assert "".join(d["text"] for d in deltas) == "Reset your password from the sign-in page."
    assert typing_off == {
        "type": "typing",
        "role": "assistant",
        "state": False,
        "message_id": str(message.pk),
    }
    assert ack == {
        "type": "ack",
        "message_id": str(message.pk),
        "client_message_id": "c-1",
        "duplicate": False,
    }
    assert turn["type"] == "turn"
    assert turn["message_id"] == str(message.pk)
    assert turn["content"] == "Reset your password from the sign-in page."
    assert (turn["thread_event"], turn["thread_id"], turn["session_id"]) == (
        "NEW_TOPIC",
        str(thread.pk),
        str(session.pk),
    )
    assert (turn["status"], turn["user_id"], turn["reply_id"]) == ("done", "alice", str(reply.pk))
    assert (turn["offline"], turn["handled_by"], turn["escalated"]) == (False, "llm", False)

    assert (
        message.content,
        message.status,
        message.thread_id,
        message.thread_event,
        message.client_message_id,
    ) == ("My login is broken", "done", thread.pk, "NEW_TOPIC", "c-1")
    assert (reply.content, reply.reply_to_id, reply.thread_id, reply.offline) == (
        turn["content"],
        message.pk,
        thread.pk,
        False,
    )
    assert thread.topic == "My login is broken"
    assert [r["body"]["messages"] for r in fake_llm.requests] == [
        [{"role": "user", "content": "My login is broken"}]
    ]

    # The same client id again: acked as a duplicate of the same message, no second turn.
    await communicator.send_json_to(
        {"type": "message", "message": "My login is broken", "client_message_id": "c-1"}
    )
    assert await communicator.receive_json_from() == {
        "type": "ack",
        "message_id": str(message.pk),
        "client_message_id": "c-1",
        "duplicate": True,
    }
    # ... and its finished turn again, for a client that missed it; no other frame.
    assert await communicator.receive_json_from() == turn
    assert await communicator.receive_nothing(timeout=0.5)
    assert await Message.objects.acount() == 2
    assert len(fake_llm.requests) == 1
    await communicator.disconnect()


@pytest.mark.integration
async def test_turn_events_reach_only_the_users_own_connections(celery_worker, fake_llm) -> None:
    fake_llm.enqueue(FakeReply(text="Bob's reply."))
    alice = await _connect("alice")
    bob = await _connect("bob")
    bob_other_tab = await _connect("bob")

    await bob.send_json_to({"type": "message", "message": "How do I create an S3 bucket?"})
    ack = await bob.receive_json_from()
    turn, _ = await receive_until(bob, "turn", timeout=TURN_TIMEOUT)
    other_tab_turn, _ = await receive_until(bob_other_tab, "turn", timeout=TURN_TIMEOUT)

    bob_message = await Message.objects.aget(role="user")
    assert ack == {
        "type": "ack",
        "message_id": str(bob_message.pk),
        "client_message_id": None,
        "duplicate": False,
    }
    assert (turn["type"], turn["message_id"], turn["user_id"], turn["content"]) == (
        "turn",
        str(bob_message.pk),
        "bob",
        "Bob's reply.",
    )
    assert other_tab_turn == turn
    assert await alice.receive_nothing(timeout=1.0)
    assert await Message.objects.filter(user__external_id="alice").acount() == 0
    assert await Message.objects.filter(user__external_id="bob").acount() == 2
    for communicator in (alice, bob, bob_other_tab):
        await communicator.disconnect()


@pytest.mark.integration
async def test_failed_turn_sends_an_error_frame_and_resending_retries_it(celery_worker, fake_llm) -> None:
    fake_llm.enqueue_error(400, message="prompt is too long")  # not transient: no Celery retry
    fake_llm.enqueue(FakeReply(text="Second time lucky."))
    communicator = await _connect("alice")
    frame = {"type": "message", "message": "My login is broken", "client_message_id": "c-1"}

    await communicator.send_json_to(frame)
    ack = await communicator.receive_json_from()
    error, _ = await receive_until(communicator, "error", timeout=TURN_TIMEOUT)

    message = await Message.objects.aget(role="user")
    assert ack == {
        "type": "ack",
        "message_id": str(message.pk),
        "client_message_id": "c-1",
        "duplicate": False,
    }
    assert error == {
        "type": "error",
        "code": "llm_error",
        "message": "The assistant is unavailable right now.",
        "message_id": str(message.pk),
    }
    assert (message.status, message.error) == (
        "failed",
        "Anthropic API error 400: Error code: 400 - {'type': 'error', 'error': "
        "{'type': 'invalid_request_error', 'message': 'prompt is too long'}}",
    )
    assert await Message.objects.filter(role="assistant").acount() == 0

    await communicator.send_json_to(frame)
    again = await communicator.receive_json_from()
    turn, _ = await receive_until(communicator, "turn", timeout=TURN_TIMEOUT)

    assert again == {
        "type": "ack",
        "message_id": str(message.pk),
        "client_message_id": "c-1",
        "duplicate": True,
    }
    assert (turn["type"], turn["message_id"], turn["status"], turn["content"], turn["error"]) == (
        "turn",
        str(message.pk),
        "done",
        "Second time lucky.",
        None,
    )
    await message.arefresh_from_db()
    assert (message.status, message.error) == ("done", "")
    assert await Message.objects.filter(role="assistant").acount() == 1
    assert await Thread.objects.acount() == 1
    assert len(fake_llm.requests) == 2
    await communicator.disconnect()
