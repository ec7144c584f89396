"""Thread detection through the real transports: REST and WebSocket -> Celery worker -> PostgreSQL.

The seed's login/S3 script, one Celery round trip per message (the fake LLM echoes each one):

    "My login is broken"                      NEW_TOPIC   thread L
    "It says invalid password when I try"     FOLLOW_UP   L
    "Actually, different question about S3"   NEW_TOPIC   thread S (a new one)
    "Thanks, that fixed the login!"           RESOLUTION  L (not the active S)
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.test import AsyncClient

from agentflow_project.asgi import application
from conversations.models import Message, Thread
from tests.conftest import ORIGIN

from .helpers import astored_counts, without_server_time

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

TURN_TIMEOUT = 20

LOGIN = "My login is broken"
FOLLOW = "It says invalid password when I try"
S3 = "Actually, different question about S3"
THANKS = "Thanks, that fixed the login!"
SCRIPT = [LOGIN, FOLLOW, S3, THANKS]
EVENTS = ["NEW_TOPIC", "FOLLOW_UP", "NEW_TOPIC", "RESOLUTION"]


def _headers(api_key: str) -> dict[str, str]:
    return {"X-API-Key": api_key}


async def _post(client: AsyncClient, api_key: str, user: str, text: str):
    return await client.post(
        f"/api/users/{user}/messages",
        {"message": text, "wait_seconds": TURN_TIMEOUT},
        content_type="application/json",
        headers=_headers(api_key),
    )


async def _say(client: AsyncClient, api_key: str, user: str, text: str) -> dict[str, Any]:
    response = await _post(client, api_key, user, text)
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["status"], body["user_id"], body["content"], body["error"]) == (
        "done",
        user,
        f"Echo: {text}",
        None,
    ), body
    return body


async def _get(client: AsyncClient, api_key: str, path: str) -> Any:
    response = await client.get(path, headers=_headers(api_key))
    assert response.status_code == 200, response.content
    return response.json()


async def _connect(client: AsyncClient, api_key: str, user: str) -> WebsocketCommunicator:
    response = await client.post(f"/api/users/{user}/chat-token", headers=_headers(api_key))
    assert response.status_code == 200, response.content
    token = response.json()["token"]
    communicator = WebsocketCommunicator(application, f"/ws/chat/?token={token}", headers=[ORIGIN])
    connected, _ = await communicator.connect()
    assert connected
    ready = without_server_time(await communicator.receive_json_from())
    assert ready == {"type": "ready", "user_id": user, "protocol": 1, "agent": "agentflow"}
    return communicator


async def _ws_say(communicator: WebsocketCommunicator, text: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Send a message; return its ack and the turn frame for it (other frames are skipped)."""
    await communicator.send_json_to({"type": "message", "message": text})
    ack = await communicator.receive_json_from()
    while ack["type"] == "typing" and ack["state"] is False:  # the end of the previous turn
        ack = await communicator.receive_json_from()
    assert ack["type"] == "ack", ack
    assert (ack["duplicate"], ack["client_message_id"]) == (False, None)
    deadline = time.monotonic() + TURN_TIMEOUT
    while (remaining := deadline - time.monotonic()) > 0:
        frame = await communicator.receive_json_from(timeout=remaining)
        if frame.get("type") == "turn" and frame.get("message_id") == ack["message_id"]:
            return ack, frame
    raise AssertionError(f"no turn frame for {ack['message_id']} within {TURN_TIMEOUT} s")


async def _thread_rows(user: str) -> dict[str, tuple[str, str, int, str]]:
    """status, topic, topic_weight (user messages folded into the topic; a resolution is not), resolution."""
    return {
        str(t.pk): (t.status, t.topic, t.topic_weight, t.resolution)
        async for t in Thread.objects.filter(user__external_id=user)
    }


async def _user_messages(user: str) -> list[tuple[str, str | None, str, str]]:
    return [
        (m.content, str(m.thread_id) if m.thread_id else None, m.thread_event, m.status)
        async for m in Message.objects.filter(user__external_id=user, role="user").order_by("created_at")
    ]


# --- REST ---------------------------------------------------------------------------------------


async def test_rest_login_s3_script_threads_resolves_and_lists(celery_worker, api_key, fake_llm) -> None:
    client = AsyncClient()

    turns = [await _say(client, api_key, "rest-alice", text) for text in SCRIPT]

    login = turns[0]["thread_id"]
    s3 = turns[2]["thread_id"]
    assert login and s3 and login != s3
    assert [(t["thread_event"], t["thread_id"]) for t in turns] == list(
        zip(EVENTS, [login, login, s3, login], strict=True)
    )
    assert len({t["session_id"] for t in turns}) == 1
    assert len(fake_llm.requests) == 4

    # The thread listing: most recently active first; the resolution touched L last.
    threads = await _get(client, api_key, "/api/users/rest-alice/threads")
    assert [(t["id"], t["status"], t["topic"]) for t in threads] == [
        (login, "resolved", LOGIN),
        (s3, "open", S3),
    ]
    by_id = {t["id"]: t for t in threads}
    assert by_id[login]["resolved_at"] is not None
    assert by_id[s3]["resolved_at"] is None
    assert {t["session_id"] for t in threads} == {turns[0]["session_id"]}
    assert await _get(client, api_key, "/api/users/rest-alice/threads?status=open") == [by_id[s3]]
    assert await _get(client, api_key, "/api/users/rest-alice/threads?status=resolved") == [by_id[login]]

    # L's messages, oldest first: each user message followed by its (echo) reply.
    messages = await _get(client, api_key, f"/api/users/rest-alice/threads/{login}/messages")
    assert [(m["role"], m["content"], m["thread_event"], m["thread_id"], m["status"]) for m in messages] == [
        ("user", LOGIN, "NEW_TOPIC", login, "done"),
        ("assistant", f"Echo: {LOGIN}", "", login, "done"),
        ("user", FOLLOW, "FOLLOW_UP", login, "done"),
        ("assistant", f"Echo: {FOLLOW}", "", login, "done"),
        ("user", THANKS, "RESOLUTION", login, "done"),
        ("assistant", f"Echo: {THANKS}", "", login, "done"),
    ]
    assert [m["id"] for m in messages if m["role"] == "user"] == [
        turns[0]["message_id"],
        turns[1]["message_id"],
        turns[3]["message_id"],
    ]
    s3_messages = await _get(client, api_key, f"/api/users/rest-alice/threads/{s3}/messages")
    assert [(m["role"], m["content"], m["thread_event"]) for m in s3_messages] == [
        ("user", S3, "NEW_TOPIC"),
        ("assistant", f"Echo: {S3}", ""),
    ]

    # Per-user isolation: the same opening from another user opens their own thread.
    bob = await _say(client, api_key, "rest-bob", LOGIN)
    assert bob["thread_event"] == "NEW_TOPIC"
    assert bob["thread_id"] not in (login, s3)
    assert bob["session_id"] != turns[0]["session_id"]
    bob_threads = await _get(client, api_key, "/api/users/rest-bob/threads")
    assert [(t["id"], t["status"], t["topic"]) for t in bob_threads] == [(bob["thread_id"], "open", LOGIN)]
    assert await _get(client, api_key, "/api/users/rest-alice/threads") == threads
    hidden = await client.get(f"/api/users/rest-bob/threads/{login}/messages", headers=_headers(api_key))
    assert hidden.status_code == 404
    assert len(fake_llm.requests) == 5

    # PostgreSQL agrees with the API.
    assert await _thread_rows("rest-alice") == {
        login: ("resolved", LOGIN, 2, THANKS),
        s3: ("open", S3, 1, ""),
    }
    assert await _user_messages("rest-alice") == [
        (LOGIN, login, "NEW_TOPIC", "done"),
        (FOLLOW, login, "FOLLOW_UP", "done"),
        (S3, s3, "NEW_TOPIC", "done"),
        (THANKS, login, "RESOLUTION", "done"),
    ]
    assert await _user_messages("rest-bob") == [(LOGIN, bob["thread_id"], "NEW_TOPIC", "done")]


# --- WebSocket ----------------------------------------------------------------------------------


async def test_ws_login_s3_script_threads_and_resolves(celery_worker, api_key, fake_llm) -> None:
    client = AsyncClient()
    communicator = await _connect(client, api_key, "ws-alice")

    acks, turns = [], []
    for text in SCRIPT:
        ack, turn = await _ws_say(communicator, text)
        acks.append(ack)
        turns.append(turn)

    login = turns[0]["thread_id"]
    s3 = turns[2]["thread_id"]
    assert login and s3 and login != s3
    assert [(t["thread_event"], t["thread_id"]) for t in turns] == list(
        zip(EVENTS, [login, login, s3, login], strict=True)
    )
    assert [t["message_id"] for t in turns] == [a["message_id"] for a in acks]
    assert [(t["status"], t["user_id"], t["content"], t["error"]) for t in turns] == [
        ("done", "ws-alice", f"Echo: {text}", None) for text in SCRIPT
    ]
    assert len({t["session_id"] for t in turns}) == 1
    assert len(fake_llm.requests) == 4

    # The rows in PostgreSQL.
    assert await _thread_rows("ws-alice") == {login: ("resolved", LOGIN, 2, THANKS), s3: ("open", S3, 1, "")}
    assert await _user_messages("ws-alice") == [
        (LOGIN, login, "NEW_TOPIC", "done"),
        (FOLLOW, login, "FOLLOW_UP", "done"),
        (S3, s3, "NEW_TOPIC", "done"),
        (THANKS, login, "RESOLUTION", "done"),
    ]
    stored = {str(m.pk): m async for m in Message.objects.filter(user__external_id="ws-alice", role="user")}
    assert [str(stored[t["message_id"]].thread_id) for t in turns] == [login, login, s3, login]
    replies = [
        (str(m.reply_to_id), str(m.thread_id))
        async for m in Message.objects.filter(user__external_id="ws-alice", role="assistant").order_by(
            "created_at"
        )
    ]
    assert replies == [(t["message_id"], t["thread_id"]) for t in turns]
    resolved = await Thread.objects.aget(pk=login)
    assert resolved.resolved_at is not None
    await communicator.disconnect()


# --- malformed input changes no thread ----------------------------------------------------------


async def test_malformed_messages_over_rest_and_ws_change_no_thread(celery_worker, api_key, fake_llm) -> None:
    client = AsyncClient()
    first = await _say(client, api_key, "bad-carol", LOGIN)
    assert first["thread_event"] == "NEW_TOPIC"
    thread = await Thread.objects.aget()
    before = await astored_counts()
    snapshot = (thread.status, thread.topic, thread.topic_weight, thread.last_activity_at, thread.vocabulary)
    assert (before["threads"], thread.topic_weight) == (1, 1)

    response = await _post(client, api_key, "bad-carol", "")
    assert response.status_code == 400
    assert response.json() == {
        "error": {"code": "invalid_input", "message": "message must not be empty", "field": "message"}
    }

    communicator = await _connect(client, api_key, "bad-carol")
    await communicator.send_json_to({"type": "message", "message": "", "client_message_id": "c-empty"})
    assert await communicator.receive_json_from() == {
        "type": "error",
        "code": "invalid_input",
        "message": "message must not be empty",
        "field": "message",
        "client_message_id": "c-empty",
    }
    await communicator.send_json_to({"type": "ping"})
    assert await communicator.receive_json_from() == {"type": "pong"}
    assert await communicator.receive_nothing(timeout=0.5)

    assert await astored_counts() == before
    assert await Thread.objects.acount() == 1
    await thread.arefresh_from_db()
    assert (
        thread.status,
        thread.topic,
        thread.topic_weight,
        thread.last_activity_at,
        thread.vocabulary,
    ) == snapshot
    assert len(fake_llm.requests) == 1
    await communicator.disconnect()
