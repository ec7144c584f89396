"""Clear answers while a component is down (REST: JSON 503 + Retry-After; WebSocket: error frame + 1013),
and a REST call that waits for its turn without holding a database connection."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from asgiref.sync import ThreadSensitiveContext, sync_to_async
from channels.testing import WebsocketCommunicator
from django.db import connection, connections
from django.db.utils import OperationalError
from django.test import AsyncClient, Client, RequestFactory

import conversations.api
from agentflow.web.http import ApiHttpMiddleware
from agentflow_project.asgi import application
from conversations import ratelimit
from conversations.chat_tokens import chat_token_create
from conversations.models import AuditEvent, Message
from tests.conftest import ORIGIN
from tests.conversations.helpers import astored_counts, stored_counts, without_server_time
from tests.faults import dead_redis_url, refused_pool

DATABASE_DOWN = (
    "the database is unavailable; try again shortly (resending with the same client_message_id is safe)"
)
REDIS_DOWN = (
    "Redis (cache, channel layer or queue) is unavailable; try again shortly"
    " (resending with the same client_message_id is safe)"
)


def _post(api_key: str, user_id: str = "alice", **payload: Any) -> Any:
    return Client().post(
        f"/api/users/{user_id}/messages",
        {"message": "hello", **payload},
        content_type="application/json",
        headers={"X-API-Key": api_key},
    )


@pytest.fixture
def dead_channel_layer(settings: Any) -> None:
    settings.CHANNEL_LAYERS = {
        "default": {
            "BACKEND": "agentflow.channel_layer.RedisChannelLayer",
            "CONFIG": {"hosts": [dead_redis_url()]},
        }
    }


@pytest.fixture
def queued(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The turns the REST view queues, recorded instead of sent (no worker runs them)."""
    calls: list[Any] = []
    monkeypatch.setattr(conversations.api, "queue_turn", lambda message_id, **hint: calls.append(message_id))
    return calls


# --- REST ----------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_post_while_redis_is_down_is_a_json_503_and_stores_nothing(
    api_key: str, settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings.REDIS_URL = dead_redis_url()
    monkeypatch.setattr(ratelimit, "_client", None)  # the rate limits connect anew, to the dead port
    monkeypatch.setattr(ratelimit, "_scripts", {})
    before = (stored_counts(), AuditEvent.objects.count())

    response = _post(api_key)

    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert response["Content-Type"] == "application/json; charset=utf-8"
    assert response.json() == {"error": {"code": "unavailable", "message": REDIS_DOWN}}
    assert (stored_counts(), AuditEvent.objects.count()) == before


@pytest.mark.django_db(transaction=True)
def test_post_while_the_database_pool_refuses_is_a_json_503_and_stores_nothing(api_key: str) -> None:
    before = stored_counts()
    connection.close()  # the next query asks the pool

    with refused_pool():
        response = _post(api_key)
        read = Client().get("/api/users/alice/sessions", headers={"X-API-Key": api_key})

    assert (response.status_code, read.status_code) == (503, 503)
    assert (response["Retry-After"], read["Retry-After"]) == ("5", "5")
    assert response.json() == read.json() == {"error": {"code": "unavailable", "message": DATABASE_DOWN}}
    assert stored_counts() == before


@pytest.mark.django_db
def test_post_while_the_channel_layer_is_down_queues_the_turn_and_answers_202(
    api_key: str, dead_channel_layer: None, queued: list[Any]
) -> None:
    response = _post(api_key, client_message_id="c-1", wait_seconds=5)

    assert response.status_code == 202
    message = Message.objects.get()
    assert (response.json()["message_id"], response.json()["status"]) == (str(message.pk), "pending")
    assert queued == [message.pk]  # stored and queued: the worker answers it; the client polls


def test_an_infrastructure_error_escaping_the_api_becomes_a_json_503() -> None:
    request = RequestFactory().get("/api/users/alice/sessions")
    middleware = ApiHttpMiddleware(lambda request: None)

    response = middleware.process_exception(request, OperationalError("server closed the connection"))
    elsewhere = middleware.process_exception(RequestFactory().get("/admin/"), OperationalError("x"))
    other = middleware.process_exception(request, ValueError("a bug"))

    assert response is not None
    assert (response.status_code, response["Retry-After"]) == (503, "5")
    assert response.content.decode() == (
        '{"error": {"code": "unavailable", "message": "' + DATABASE_DOWN + '"}}'
    )
    assert (elsewhere, other) == (None, None)  # not the API, or not a component: Django's usual 500


# --- the REST wait holds no database connection ----------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_waiting_posts_hold_no_database_connection(
    api_key: str, queued: list[Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    waiting = 5
    pool = connections["default"].pool
    assert pool is not None

    def checked_out() -> int:
        stats = pool.get_stats()
        return int(stats["pool_size"] - stats["pool_available"])

    all_waiting, all_measured = asyncio.Barrier(waiting), asyncio.Barrier(waiting)
    seen: list[int] = []

    async def measured_wait(*, message_id: Any, seconds: float) -> None:
        await all_waiting.wait()  # every request has stored its message and is about to wait
        seen.append(checked_out())
        await all_measured.wait()  # none reads its result (a connection) before all have measured

    monkeypatch.setattr(conversations.api, "turn_settled_wait", measured_wait)

    async def post(i: int) -> Any:
        # Each request on its own thread, as Django's ASGI handler runs them (ThreadSensitiveContext).
        async with ThreadSensitiveContext():
            response = await AsyncClient().post(
                f"/api/users/waiter-{i}/messages",
                {"message": "hello", "wait_seconds": 30},
                content_type="application/json",
                headers={"X-API-Key": api_key},
            )
            await sync_to_async(connections.close_all)()  # the test client does not end the request
        return response

    baseline = checked_out()
    responses = await asyncio.wait_for(asyncio.gather(*(post(i) for i in range(waiting))), 60)

    assert [r.status_code for r in responses] == [202] * waiting
    assert len(queued) == waiting
    assert seen == [baseline] * waiting  # not baseline + waiting: no connection held while waiting


# --- WebSocket -----------------------------------------------------------------------------------


def _communicator(user_id: str) -> WebsocketCommunicator:
    token = chat_token_create(external_id=user_id)
    return WebsocketCommunicator(application, f"/ws/chat/?token={token}", headers=[ORIGIN])


@pytest.mark.django_db(transaction=True)
async def test_ws_frame_while_the_database_is_down_gets_an_error_frame_and_1013() -> None:
    communicator = _communicator("alice")
    connected, _ = await communicator.connect()
    assert connected
    assert without_server_time(await communicator.receive_json_from())["type"] == "ready"
    before = await astored_counts()
    # The consumer's database threads give their connections back after each step
    # (agentflow.loops.run_db), so its next database call asks the pool.

    with refused_pool():
        await communicator.send_json_to({"type": "message", "message": "hello", "client_message_id": "c-1"})
        frame = await communicator.receive_json_from(timeout=10)
        closed = await communicator.receive_output(timeout=10)

    assert frame == {"type": "error", "code": "unavailable", "message": DATABASE_DOWN, "retry_after": 5}
    assert closed == {"type": "websocket.close", "code": 1013}
    assert await astored_counts() == before


@pytest.mark.django_db(transaction=True)
async def test_ws_connect_while_the_channel_layer_is_down_gets_an_error_frame_and_1013(
    dead_channel_layer: None,
) -> None:
    communicator = _communicator("alice")

    connected, _ = await communicator.connect(timeout=10)
    frame = await communicator.receive_json_from(timeout=10)
    closed = await communicator.receive_output(timeout=10)

    assert connected
    assert frame == {"type": "error", "code": "unavailable", "message": REDIS_DOWN, "retry_after": 5}
    assert closed == {"type": "websocket.close", "code": 1013}
