"""The REST API: authentication, input errors, per-user isolation, listings, idempotency, async turns."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from datetime import timedelta

import pytest
from django.conf import settings
from django.test import AsyncClient, Client
from django.utils import timezone

from agentflow.testing.fake_anthropic import FakeReply
from conversations.chat_tokens import chat_token_user
from conversations.models import ApiKey, ChatSession, Message, Thread

from .factories import ChatSessionFactory, EndUserFactory, MessageFactory, ThreadFactory
from .helpers import stored_counts, use_up_rate_limit

UNAUTHORIZED = {
    "error": {"code": "unauthorized", "message": "send a valid X-API-Key header (or log in as staff)"}
}
NOTHING = {"users": 0, "sessions": 0, "threads": 0, "messages": 0}


def _post_message(client: Client, api_key: str | None, body: object, user: str = "alice"):
    headers = {"X-API-Key": api_key} if api_key is not None else {}
    data = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return client.post(f"/api/users/{user}/messages", data, content_type="application/json", headers=headers)


def _get(client: Client, api_key: str, path: str, **params: str):
    return client.get(path, params, headers={"X-API-Key": api_key})


def _iso(value) -> str:
    """A datetime as the API serializes it: ISO 8601, milliseconds, Z for UTC (Django's JSON encoder)."""
    return value.isoformat(timespec="milliseconds").replace("+00:00", "Z")


# --- authentication -------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("key", [None, "afk_wrong-key", ""], ids=["missing", "wrong", "empty"])
def test_post_message_without_a_valid_key_is_401_and_stores_nothing(key: str | None) -> None:
    response = _post_message(Client(), key, {"message": "My login is broken"})

    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED
    assert stored_counts() == NOTHING


@pytest.mark.django_db
def test_a_deactivated_key_is_rejected(api_key: str) -> None:
    ApiKey.objects.update(active=False)

    response = _post_message(Client(), api_key, {"message": "My login is broken"})

    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED
    assert stored_counts() == NOTHING


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("get", "/api/users/alice/sessions"),
        ("get", "/api/users/alice/threads"),
        ("get", "/api/users/alice/threads/{thread}/messages"),
        ("get", "/api/users/alice/messages/{message}"),
        ("post", "/api/users/alice/chat-token"),
    ],
)
def test_every_user_route_needs_a_key(method: str, path: str) -> None:
    message = MessageFactory(thread__session__user__external_id="alice")
    before = stored_counts()

    response = getattr(Client(), method)(
        path.format(thread=message.thread_id, message=message.pk), headers={"X-API-Key": "afk_nope"}
    )

    assert response.status_code == 401
    assert response.json() == UNAUTHORIZED
    assert stored_counts() == before


@pytest.mark.django_db
def test_used_key_records_its_last_use(api_key: str) -> None:
    assert ApiKey.objects.get().last_used_at is None

    response = _get(Client(), api_key, "/api/health")  # no auth on health: the key is not even checked
    assert response.status_code == 200
    assert ApiKey.objects.get().last_used_at is None

    EndUserFactory(external_id="alice")
    assert _get(Client(), api_key, "/api/users/alice/sessions").status_code == 200
    assert ApiKey.objects.get().last_used_at is not None


@pytest.mark.django_db
def test_a_busy_key_writes_its_last_use_once_a_minute(api_key: str) -> None:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    EndUserFactory(external_id="alice")
    assert _get(Client(), api_key, "/api/users/alice/sessions").status_code == 200
    first = ApiKey.objects.get().last_used_at

    with CaptureQueriesContext(connection) as queries:
        assert _get(Client(), api_key, "/api/users/alice/sessions").status_code == 200
    assert not [q for q in queries if q["sql"].startswith('UPDATE "conversations_apikey"')]
    assert ApiKey.objects.get().last_used_at == first

    ApiKey.objects.update(last_used_at=first - timedelta(minutes=1))  # a minute later
    assert _get(Client(), api_key, "/api/users/alice/sessions").status_code == 200
    assert ApiKey.objects.get().last_used_at > first


# --- input errors on POST /messages: nothing stored -----------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("text", "error"),
    [
        ("", "message must not be empty"),
        ("   \n\t  ", "message must not be empty"),
        ("\x00\x01\x02", "message must not be empty"),
        ("x" * 4001, "message is 4001 characters; the limit is 4000 (input_config.max_message_chars)"),
    ],
    ids=["empty", "whitespace", "control-characters", "oversized"],
)
def test_invalid_message_is_400_and_stores_nothing(api_key: str, text: str, error: str) -> None:
    response = _post_message(Client(), api_key, {"message": text})

    assert response.status_code == 400
    assert response.json() == {"error": {"code": "invalid_input", "message": error, "field": "message"}}
    assert stored_counts() == NOTHING


@pytest.mark.django_db
def test_invalid_message_for_a_known_user_leaves_their_conversation_untouched(api_key: str) -> None:
    message = MessageFactory(thread__session__user__external_id="alice")
    session = ChatSession.objects.get()
    before = stored_counts()

    response = _post_message(Client(), api_key, {"message": "   "})

    assert response.status_code == 400
    assert stored_counts() == before
    session.refresh_from_db()
    assert ChatSession.objects.get().last_activity_at == session.last_activity_at
    assert list(Message.objects.values_list("pk", flat=True)) == [message.pk]


@pytest.mark.django_db
def test_invalid_client_message_id_is_400(api_key: str) -> None:
    response = _post_message(Client(), api_key, {"message": "hello", "client_message_id": "has spaces"})

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid_input",
            "message": "client_message_id must be 1-100 letters, digits or '_.:-' characters",
            "field": "client_message_id",
        }
    }
    assert stored_counts() == NOTHING


@pytest.mark.django_db
def test_oversized_user_id_is_400(api_key: str) -> None:
    response = _post_message(Client(), api_key, {"message": "hello"}, user="u" * 256)

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid_input",
            "message": "user_id must be at most 255 characters",
            "field": "user_id",
        }
    }
    assert stored_counts() == NOTHING


@pytest.mark.django_db
@pytest.mark.parametrize(
    "body", ['{"message": ', "not json at all", b"\xff\xfe"], ids=["truncated", "text", "binary"]
)
def test_malformed_json_body_is_400_bad_json(api_key: str, body: str | bytes) -> None:
    response = _post_message(Client(), api_key, body)

    assert response.status_code == 400
    assert response.json() == {"error": {"code": "bad_json", "message": "Cannot parse request body"}}
    assert stored_counts() == NOTHING


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"message": 123}, "message"),
        ({"message": ["My login is broken"]}, "message"),
        ({}, "message"),
        ({"message": "hi", "client_message_id": 7}, "client_message_id"),
        ({"message": "hi", "wait_seconds": "soon"}, "wait_seconds"),
        ({"message": "hi", "wait_seconds": -1}, "wait_seconds"),
        ({"message": "hi", "wait_seconds": 121}, "wait_seconds"),
    ],
    ids=["int", "list", "missing", "client-id-int", "wait-text", "wait-negative", "wait-too-long"],
)
def test_wrong_types_and_ranges_are_422_invalid_request(api_key: str, body: dict, field: str) -> None:
    response = _post_message(Client(), api_key, body)

    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid_request"
    assert error["field"] == field
    assert error["message"].startswith(f"{field}: ")
    assert stored_counts() == NOTHING


@pytest.mark.django_db
def test_json_that_is_not_an_object_is_422(api_key: str) -> None:
    response = _post_message(Client(), api_key, '["My login is broken"]')

    assert response.status_code == 422
    assert response.json()["error"]["code"] == "invalid_request"
    assert stored_counts() == NOTHING


@pytest.mark.django_db
def test_rate_limited_message_is_429_with_retry_after_and_stores_nothing(api_key: str, monkeypatch) -> None:
    monkeypatch.setenv("AGENT_RATE_LIMIT_MESSAGES_PER_MINUTE", "2")  # read when the agent is built
    use_up_rate_limit("alice", 2)

    response = _post_message(Client(), api_key, {"message": "My login is broken"})

    assert response.status_code == 429
    retry = int(response["Retry-After"])
    assert 1 <= retry <= 30  # one message every 30 s
    assert response.json() == {
        "error": {
            "code": "rate_limited",
            "message": f"too many messages: at most 10 at once and 2 a minute; try again in {retry} s",
        }
    }
    assert stored_counts() == NOTHING


# --- reads: unknown users, bad ids, isolation -------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path",
    [
        "/api/users/ghost/sessions",
        "/api/users/ghost/threads",
        f"/api/users/ghost/threads/{uuid.UUID(int=1)}/messages",
        f"/api/users/ghost/messages/{uuid.UUID(int=1)}",
    ],
)
def test_unknown_user_is_404(api_key: str, path: str) -> None:
    response = _get(Client(), api_key, path)

    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": "user 'ghost' not found"}}
    assert stored_counts() == NOTHING


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("path", "params", "message"),
    [
        ("/api/users/alice/messages/not-a-uuid", {}, "message 'not-a-uuid' not found"),
        ("/api/users/alice/threads/123/messages", {}, "thread '123' not found"),
        ("/api/users/alice/threads", {"session_id": "zzz"}, "session 'zzz' not found"),
        (
            f"/api/users/alice/messages/{uuid.UUID(int=7)}",
            {},
            f"message {uuid.UUID(int=7)} not found for this user",
        ),
        (
            f"/api/users/alice/threads/{uuid.UUID(int=7)}/messages",
            {},
            f"thread {uuid.UUID(int=7)} not found for this user",
        ),
        (
            "/api/users/alice/threads",
            {"session_id": str(uuid.UUID(int=7))},
            f"session {uuid.UUID(int=7)} not found for this user",
        ),
    ],
    ids=[
        "message-malformed",
        "thread-malformed",
        "session-malformed",
        "message-absent",
        "thread-absent",
        "session-absent",
    ],
)
def test_malformed_or_absent_ids_are_404(api_key: str, path: str, params: dict, message: str) -> None:
    EndUserFactory(external_id="alice")

    response = _get(Client(), api_key, path, **params)

    assert response.status_code == 404
    assert response.json() == {"error": {"code": "not_found", "message": message}}


@pytest.mark.django_db
def test_turn_endpoint_only_names_user_messages(api_key: str) -> None:
    question = MessageFactory(thread__session__user__external_id="alice")
    reply = MessageFactory(thread=question.thread, role=Message.Role.ASSISTANT, reply_to=question)

    response = _get(Client(), api_key, f"/api/users/alice/messages/{reply.pk}")

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid_input",
            "message": "message_id must name a user message",
            "field": "message_id",
        }
    }


@pytest.mark.django_db
def test_thread_status_filter_is_validated(api_key: str) -> None:
    EndUserFactory(external_id="alice")

    response = _get(Client(), api_key, "/api/users/alice/threads", status="closed")

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid_input",
            "message": "status must be open, dormant or resolved",
            "field": "status",
        }
    }


@pytest.mark.django_db
def test_a_user_cannot_read_another_users_conversation(api_key: str) -> None:
    a_question = MessageFactory(thread__session__user__external_id="alice", content="alice's secret question")
    MessageFactory(
        thread=a_question.thread,
        role=Message.Role.ASSISTANT,
        reply_to=a_question,
        content="alice's secret answer",
    )
    b_message = MessageFactory(thread__session__user__external_id="bob", content="bob's own message")
    client = Client()

    # The same ids work on alice's own paths: the 404s below are about ownership, not bad ids.
    assert _get(client, api_key, f"/api/users/alice/messages/{a_question.pk}").status_code == 200
    assert (
        _get(client, api_key, f"/api/users/alice/threads/{a_question.thread_id}/messages").status_code == 200
    )

    denied = [
        (f"/api/users/bob/messages/{a_question.pk}", {}, f"message {a_question.pk} not found for this user"),
        (
            f"/api/users/bob/threads/{a_question.thread_id}/messages",
            {},
            f"thread {a_question.thread_id} not found for this user",
        ),
        (
            "/api/users/bob/threads",
            {"session_id": str(a_question.session_id)},
            f"session {a_question.session_id} not found for this user",
        ),
    ]
    for path, params, message in denied:
        response = _get(client, api_key, path, **params)
        assert response.status_code == 404, path
        assert response.json() == {"error": {"code": "not_found", "message": message}}
        assert b"secret" not in response.content

    threads = _get(client, api_key, "/api/users/bob/threads").json()
    assert [t["id"] for t in threads] == [str(b_message.thread_id)]
    sessions = _get(client, api_key, "/api/users/bob/sessions").json()
    assert [s["id"] for s in sessions] == [str(b_message.session_id)]
    messages = _get(client, api_key, f"/api/users/bob/threads/{b_message.thread_id}/messages").json()
    assert [m["content"] for m in messages] == ["bob's own message"]


# --- listings ---------------------------------------------------------------------------------


@pytest.mark.django_db
def test_sessions_are_listed_most_recent_first(api_key: str) -> None:
    now = timezone.now()
    user = EndUserFactory(external_id="alice")
    old = ChatSessionFactory(
        user=user, last_activity_at=now - timedelta(hours=3), status=ChatSession.Status.EXPIRED
    )
    new = ChatSessionFactory(user=user, last_activity_at=now - timedelta(minutes=1))
    middle = ChatSessionFactory(
        user=user, last_activity_at=now - timedelta(hours=1), status=ChatSession.Status.ENDED
    )
    ChatSessionFactory(user__external_id="bob")

    response = _get(Client(), api_key, "/api/users/alice/sessions")

    assert response.status_code == 200
    body = response.json()
    assert [s["id"] for s in body] == [str(new.pk), str(middle.pk), str(old.pk)]
    new.refresh_from_db()
    assert body[0] == {
        "id": str(new.pk),
        "status": "active",
        "started_at": _iso(new.started_at),
        "last_activity_at": _iso(new.last_activity_at),
        "expires_at": _iso(new.expires_at),
    }
    assert [s["status"] for s in body] == ["active", "ended", "expired"]


@pytest.mark.django_db
def test_threads_are_listed_most_recent_first_and_filter_by_status_and_session(api_key: str) -> None:
    now = timezone.now()
    user = EndUserFactory(external_id="alice")
    first_session = ChatSessionFactory(user=user, last_activity_at=now - timedelta(hours=2))
    second_session = ChatSessionFactory(user=user)
    resolved = ThreadFactory(
        session=first_session,
        status=Thread.Status.RESOLVED,
        last_activity_at=now - timedelta(minutes=30),
        resolved_at=now - timedelta(minutes=30),
        resolution="Thanks, that fixed the login!",
        topic="login",
    )
    dormant = ThreadFactory(
        session=first_session, status=Thread.Status.DORMANT, last_activity_at=now - timedelta(minutes=20)
    )
    open_ = ThreadFactory(
        session=second_session, intent="BILLING", last_activity_at=now - timedelta(minutes=1)
    )
    ThreadFactory(session__user__external_id="bob")
    client = Client()

    everything = _get(client, api_key, "/api/users/alice/threads").json()
    assert [t["id"] for t in everything] == [str(open_.pk), str(dormant.pk), str(resolved.pk)]
    resolved.refresh_from_db()
    assert everything[2] == {
        "id": str(resolved.pk),
        "session_id": str(first_session.pk),
        "status": "resolved",
        "topic": "login",
        "intent": "",
        "escalated": False,
        "opened_at": _iso(resolved.opened_at),
        "last_activity_at": _iso(resolved.last_activity_at),
        "resolved_at": _iso(resolved.resolved_at),
        "resolution": "Thanks, that fixed the login!",
    }
    assert everything[0]["intent"] == "BILLING"
    assert everything[0]["resolved_at"] is None

    def ids(**params: str) -> list[str]:
        response = _get(client, api_key, "/api/users/alice/threads", **params)
        assert response.status_code == 200
        return [t["id"] for t in response.json()]

    assert ids(status="open") == [str(open_.pk)]
    assert ids(status="dormant") == [str(dormant.pk)]
    assert ids(status="resolved") == [str(resolved.pk)]
    assert ids(session_id=str(first_session.pk)) == [str(dormant.pk), str(resolved.pk)]
    assert ids(session_id=str(second_session.pk)) == [str(open_.pk)]
    assert ids(session_id=str(first_session.pk), status="resolved") == [str(resolved.pk)]
    assert ids(session_id=str(second_session.pk), status="resolved") == []


@pytest.mark.django_db
def test_thread_messages_are_listed_oldest_first(api_key: str) -> None:
    now = timezone.now()
    thread = ThreadFactory(session__user__external_id="alice")
    other_thread = ThreadFactory(session=thread.session)
    # Created out of order on purpose; created_at (auto_now_add) is then set to a controlled clock.
    later = MessageFactory(thread=thread, content="It says invalid password when I try")
    first = MessageFactory(
        thread=thread, content="My login is broken", thread_event="NEW_TOPIC", intent="LOGIN", confidence=0.91
    )
    reply = MessageFactory(
        thread=thread,
        role=Message.Role.ASSISTANT,
        reply_to=first,
        content="Try a reset.",
        usage={"input_tokens": 12, "output_tokens": 3},
        latency_ms=41.5,
    )
    MessageFactory(thread=other_thread, content="elsewhere")
    for offset, message in ((3, later), (1, first), (2, reply)):
        Message.objects.filter(pk=message.pk).update(created_at=now - timedelta(minutes=10 - offset))

    response = _get(Client(), api_key, f"/api/users/alice/threads/{thread.pk}/messages")

    assert response.status_code == 200
    body = response.json()
    assert [m["id"] for m in body] == [str(first.pk), str(reply.pk), str(later.pk)]
    assert body[0] == {
        "id": str(first.pk),
        "thread_id": str(thread.pk),
        "role": "user",
        "content": "My login is broken",
        "status": "done",
        "thread_event": "NEW_TOPIC",
        "intent": "LOGIN",
        "confidence": 0.91,
        "escalated": False,
        "offline": False,
        "usage": {},
        "latency_ms": None,
        "created_at": _iso(now - timedelta(minutes=9)),
    }
    assert (body[1]["role"], body[1]["usage"], body[1]["latency_ms"]) == (
        "assistant",
        {"input_tokens": 12, "output_tokens": 3},
        41.5,
    )


@pytest.mark.django_db
def test_turn_result_of_a_stored_turn(api_key: str) -> None:
    question = MessageFactory(
        thread__session__user__external_id="alice",
        content="My login is broken",
        thread_event="FOLLOW_UP",
        thread_confidence=0.77,
        intent="LOGIN",
        confidence=0.8,
        intent_candidates=[{"intent": "LOGIN", "confidence": 0.8}, {"intent": "BILLING", "confidence": 0.1}],
    )
    reply = MessageFactory(
        thread=question.thread,
        role=Message.Role.ASSISTANT,
        reply_to=question,
        content="Reset it.",
        model="claude-test",
        usage={"input_tokens": 5, "output_tokens": 2},
        latency_ms=12.0,
        llm_latency_ms=9.0,
        handled_by="llm",
    )

    response = _get(Client(), api_key, f"/api/users/alice/messages/{question.pk}")

    assert response.status_code == 200
    assert response.json() == {
        "status": "done",
        "message_id": str(question.pk),
        "user_id": "alice",
        "session_id": str(question.session_id),
        "thread_id": str(question.thread_id),
        "thread_event": "FOLLOW_UP",
        "thread_confidence": 0.77,
        "intent": "LOGIN",
        "confidence": 0.8,
        "runners_up": [{"intent": "LOGIN", "confidence": 0.8}, {"intent": "BILLING", "confidence": 0.1}],
        "escalated": False,
        "content": "Reset it.",
        "reply_id": str(reply.pk),
        "offline": False,
        "model": "claude-test",
        "usage": {"input_tokens": 5, "output_tokens": 2},
        "latency_ms": 12.0,
        "llm_latency_ms": 9.0,
        "memories_used": [],
        "handled_by": "llm",
        "reply_confidence": None,
        "error": None,
    }


# --- chat token, health, docs -------------------------------------------------------------------


@pytest.mark.django_db
def test_chat_token_is_signed_for_the_user_and_stores_nothing(api_key: str) -> None:
    response = Client().post("/api/users/alice/chat-token", headers={"X-API-Key": api_key})

    assert response.status_code == 200
    body = response.json()
    assert set(body) == {"token", "expires_in", "websocket_path", "agent"}
    assert (body["expires_in"], body["websocket_path"]) == (3600, "/ws/chat/")
    assert chat_token_user(body["token"]) == "alice"
    assert chat_token_user(body["token"] + "x") is None
    assert stored_counts() == NOTHING


@pytest.mark.django_db
def test_chat_token_rejects_a_blank_user_id(api_key: str) -> None:
    response = Client().post("/api/users/%20%20/chat-token", headers={"X-API-Key": api_key})

    assert response.status_code == 400
    assert response.json() == {
        "error": {"code": "invalid_input", "message": "user_id must not be empty", "field": "user_id"}
    }


def _health_summary(body: dict) -> dict:
    """The health body with each component reduced to its ``ok`` (latencies and ages vary)."""
    return {**body, "components": {name: c["ok"] for name, c in body["components"].items()}}


@pytest.mark.django_db
def test_health_needs_no_key() -> None:
    response = Client().get("/api/health")

    assert response.status_code == 200
    worker = response.json()["components"]["worker"]["ok"]  # True once this session started a worker
    assert _health_summary(response.json()) == {
        "status": "ok",
        "offline": True,
        "redis": settings.REDIS_SOURCE,
        "ready": worker,
        "components": {"database": True, "redis": True, "channel_layer": True, "worker": worker},
    }


@pytest.mark.django_db
def test_health_reports_online_mode_with_an_llm_key(fake_llm) -> None:
    response = Client().get("/api/health")

    body = response.json()
    assert (body["status"], body["offline"], body["redis"]) == ("ok", False, settings.REDIS_SOURCE)


@pytest.mark.django_db
def test_openapi_schema_is_served() -> None:
    response = Client().get("/api/openapi.json")

    assert response.status_code == 200
    schema = response.json()
    assert schema["info"]["title"] == "AgentFlow API"
    assert {
        "/api/health",
        "/api/health/live",
        "/api/health/ready",
        "/api/users/{user_id}/messages",
        "/api/users/{user_id}/messages/{message_id}",
        "/api/users/{user_id}/sessions",
        "/api/users/{user_id}/threads",
        "/api/users/{user_id}/threads/{thread_id}/messages",
        "/api/users/{user_id}/chat-token",
        "/api/agents/{agent}/users/{user_id}/messages",
        "/api/agents/{agent}/users/{user_id}/messages/{message_id}",
        "/api/agents/{agent}/users/{user_id}/sessions",
        "/api/agents/{agent}/users/{user_id}/threads",
        "/api/agents/{agent}/users/{user_id}/threads/{thread_id}/messages",
        "/api/agents/{agent}/users/{user_id}/chat-token",
    } <= set(schema["paths"])
    assert schema["paths"]["/api/users/{user_id}/messages"]["post"]["summary"] == (
        "Send a user's message (the default agent) and get the turn result"
    )


@pytest.mark.django_db
def test_docs_page_and_its_assets_are_served_locally() -> None:
    client = Client()
    response = client.get("/api/docs")

    assert response.status_code == 200
    html = response.content.decode()
    assert "/api/openapi.json" in html
    # Offline: every script and stylesheet comes from this server, none from a CDN.
    assets = re.findall(r'(?:src|href)="([^"]+\.(?:js|css))"', html)
    assert assets, html
    assert all(asset.startswith("/static/") for asset in assets), assets
    assert "/static/ninja/swagger-ui-bundle.js" in assets
    for asset in assets:
        asset_response = client.get(asset)
        assert asset_response.status_code == 200, asset
        body = (
            b"".join(asset_response.streaming_content) if asset_response.streaming else asset_response.content
        )
        assert len(body) > 100, asset


# --- turns through the Celery worker ------------------------------------------------------------


async def _wait_until_done(client: AsyncClient, api_key: str, user: str, message_id: str) -> dict:
    for _ in range(150):
        response = await client.get(
            f"/api/users/{user}/messages/{message_id}", headers={"X-API-Key": api_key}
        )
        assert response.status_code == 200
        body = response.json()
        if body["status"] == "done":
            return body
        assert body["status"] in ("pending", "processing"), body
        await asyncio.sleep(0.1)
    raise AssertionError(f"turn {message_id} not done after 15 s: {body}")


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
async def test_wait_zero_returns_202_then_the_turn_completes_in_the_worker(
    celery_worker, api_key, fake_llm
) -> None:
    fake_llm.latency = 0.5  # the reply cannot be ready when the 202 is sent
    fake_llm.enqueue(FakeReply(text="Reset your password from the sign-in page."))
    client = AsyncClient()

    response = await client.post(
        "/api/users/alice/messages",
        {"message": "My login is broken", "wait_seconds": 0},
        content_type="application/json",
        headers={"X-API-Key": api_key},
    )

    assert response.status_code == 202, response.content
    accepted = response.json()
    # A worker may already have claimed it; it cannot have finished.
    assert accepted["status"] in ("pending", "processing")
    assert (accepted["user_id"], accepted["content"], accepted["reply_id"]) == ("alice", None, None)
    message = await Message.objects.select_related("session").aget(pk=accepted["message_id"])
    assert (message.role, message.content, str(message.session_id)) == (
        "user",
        "My login is broken",
        accepted["session_id"],
    )

    done = await _wait_until_done(client, api_key, "alice", accepted["message_id"])

    thread = await Thread.objects.aget(user__external_id="alice")
    reply = await Message.objects.aget(reply_to_id=accepted["message_id"])
    assert done["content"] == "Reset your password from the sign-in page."
    assert (done["reply_id"], done["thread_id"], done["thread_event"]) == (
        str(reply.pk),
        str(thread.pk),
        "NEW_TOPIC",
    )
    assert (done["offline"], done["handled_by"], done["model"]) == (False, "llm", "claude-sonnet-5-5")
    assert (reply.role, reply.content, reply.thread_id) == ("assistant", done["content"], thread.pk)
    assert len(fake_llm.requests) == 1
    assert fake_llm.requests[0]["body"]["messages"][-1] == {"role": "user", "content": "My login is broken"}


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
async def test_client_message_id_makes_posting_idempotent(celery_worker, api_key, fake_llm) -> None:
    fake_llm.enqueue(FakeReply(text="First and only reply."), FakeReply(text="A second turn ran!"))
    client = AsyncClient()

    async def post(text: str):
        return await client.post(
            "/api/users/alice/messages",
            {"message": text, "client_message_id": "m-1"},
            content_type="application/json",
            headers={"X-API-Key": api_key},
        )

    first = await post("My login is broken")
    again = await post("My login is broken")
    changed = await post("a different text under the same id")

    assert first.status_code == 200, first.content
    assert first.json()["content"] == "First and only reply."
    for response in (again, changed):
        assert response.status_code == 200
        assert response.json() == first.json()
    assert await Message.objects.filter(role="user").acount() == 1
    assert await Message.objects.filter(role="assistant").acount() == 1
    stored = await Message.objects.aget(role="user")
    assert (stored.content, stored.client_message_id, stored.status) == ("My login is broken", "m-1", "done")
    assert len(fake_llm.requests) == 1
    assert fake_llm.pending == 1


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
async def test_failed_turn_is_reported_and_resending_its_client_id_retries_it(
    celery_worker, api_key, fake_llm
) -> None:
    fake_llm.enqueue_error(400, message="prompt is too long")  # not transient: no Celery retry
    fake_llm.enqueue(FakeReply(text="Second time lucky."))
    client = AsyncClient()

    async def post():
        return await client.post(
            "/api/users/alice/messages",
            {"message": "My login is broken", "client_message_id": "m-1", "wait_seconds": 15},
            content_type="application/json",
            headers={"X-API-Key": api_key},
        )

    failed = await post()

    assert failed.status_code == 503, failed.content
    body = failed.json()
    assert (body["status"], body["content"], body["reply_id"]) == ("failed", None, None)
    assert body["error"] == (
        "Anthropic API error 400: Error code: 400 - {'type': 'error', 'error': "
        "{'type': 'invalid_request_error', 'message': 'prompt is too long'}}"
    )
    polled = await client.get(
        f"/api/users/alice/messages/{body['message_id']}", headers={"X-API-Key": api_key}
    )
    assert polled.json() == body

    retried = await post()

    assert retried.status_code == 200, retried.content
    done = retried.json()
    assert (done["message_id"], done["status"], done["content"], done["error"]) == (
        body["message_id"],
        "done",
        "Second time lucky.",
        None,
    )
    assert await Message.objects.filter(role="user").acount() == 1
    assert await Message.objects.filter(role="assistant").acount() == 1
    assert await Thread.objects.acount() == 1
    assert len(fake_llm.requests) == 2
