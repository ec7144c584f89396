"""Hostile input at the REST API's edges (issue 12): lone surrogates, deep JSON, oversized bodies,
paths that are not UTF-8 or hold an encoded '/', unknown routes. Each gets a clear JSON error, and
nothing is stored."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote

import pytest
from asgiref.sync import sync_to_async
from asgiref.testing import ApplicationCommunicator
from django.test import Client

from agentflow_project.asgi import application
from conversations.models import EndUser

from .factories import MessageFactory
from .helpers import astored_counts, stored_counts, turn_settled

NOTHING = {"users": 0, "sessions": 0, "threads": 0, "messages": 0}


def _post(client: Client, api_key: str, body: str | bytes, user: str = "alice"):
    return client.post(
        f"/api/users/{user}/messages", body, content_type="application/json", headers={"X-API-Key": api_key}
    )


async def _asgi(
    raw_path: bytes, *, api_key: str, method: str = "GET", body: bytes = b""
) -> tuple[int, dict[str, str], Any]:
    """One HTTP request through the ASGI application the way daphne and uvicorn send it: ``path``
    percent-decoded with ``errors="replace"`` and the bytes as sent in ``raw_path``."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": unquote(raw_path.decode("ascii")),
        "raw_path": raw_path,
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"testserver"),
            (b"x-api-key", api_key.encode()),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
    }
    communicator = ApplicationCommunicator(application, scope)
    await communicator.send_input({"type": "http.request", "body": body, "more_body": False})
    start = await communicator.receive_output(20)
    chunks = []
    while True:
        message = await communicator.receive_output(20)
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            break
    headers = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    raw = b"".join(chunks)
    return start["status"], headers, json.loads(raw) if raw else None


# --- lone surrogates and deep nesting in the body ------------------------------------------------


@pytest.mark.django_db
def test_a_lone_surrogate_in_the_message_is_400_and_stores_nothing(api_key: str) -> None:
    response = _post(Client(), api_key, '{"message": "hi \\ud800 there"}')

    assert response.status_code == 400
    assert response.json() == {
        "error": {
            "code": "invalid_input",
            "message": "message must be valid Unicode text: it holds a lone surrogate (\\ud800-\\udfff)",
            "field": "message",
        }
    }
    assert stored_counts() == NOTHING


@pytest.mark.django_db
def test_a_lone_surrogate_for_a_known_user_leaves_their_conversation_untouched(api_key: str) -> None:
    MessageFactory(thread__session__user__external_id="alice")
    before = stored_counts()

    response = _post(Client(), api_key, '{"message": "\\udfff", "client_message_id": "c-1"}')

    assert response.status_code == 400
    assert stored_counts() == before


@pytest.mark.django_db
@pytest.mark.parametrize("depth", [2_000, 50_000])
def test_json_nested_thousands_deep_is_bad_json_and_stores_nothing(api_key: str, depth: int) -> None:
    body = '{"message": ' + "[" * depth + "]" * depth + "}"

    response = _post(Client(), api_key, body)

    assert response.status_code == 400
    assert response.json() == {"error": {"code": "bad_json", "message": "Cannot parse request body"}}
    assert stored_counts() == NOTHING


# --- oversized bodies ----------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_body_over_the_upload_limit_is_413_json_and_stores_nothing(api_key: str, settings) -> None:
    body = json.dumps({"message": "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)})

    response = _post(Client(), api_key, body)

    assert response.status_code == 413
    assert response.json() == {
        "error": {
            "code": "too_large",
            "message": f"the request body is over {settings.DATA_UPLOAD_MAX_MEMORY_SIZE} bytes",
        }
    }
    assert stored_counts() == NOTHING


@pytest.mark.django_db(transaction=True)
async def test_a_body_over_the_upload_limit_is_413_under_asgi_too(api_key: str, settings) -> None:
    body = json.dumps({"message": "x" * (settings.DATA_UPLOAD_MAX_MEMORY_SIZE + 1)}).encode()

    status, headers, payload = await _asgi(
        b"/api/users/alice/messages", api_key=api_key, method="POST", body=body
    )

    assert (status, payload["error"]["code"]) == (413, "too_large")
    assert headers["content-type"].startswith("application/json")
    assert await astored_counts() == NOTHING


# --- user ids in paths ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(
    "raw_path",
    [
        b"/api/users/%FF%FF/sessions",
        b"/api/users/%FE%FE/sessions",
        b"/api/users/%ED%A0%80/sessions",  # an encoded surrogate: not UTF-8 either
        b"/api/users/al%C3ice/sessions",
    ],
)
async def test_a_path_that_is_not_utf8_is_400_never_a_user(api_key: str, raw_path: bytes) -> None:
    # What an ASGI server would have made of %FF%FF: the user "\ufffd\ufffd", shared with %FE%FE.
    await sync_to_async(MessageFactory)(thread__session__user__external_id="\ufffd\ufffd")

    status, headers, body = await _asgi(raw_path, api_key=api_key)

    assert status == 400
    assert body == {
        "error": {"code": "invalid_path", "message": "the URL path is not valid UTF-8 once percent-decoded"}
    }
    assert headers["cache-control"] == "no-store"


@pytest.mark.django_db(transaction=True)
async def test_posting_to_a_path_that_is_not_utf8_stores_nothing(api_key: str) -> None:
    status, _, body = await _asgi(
        b"/api/users/%FF%FF/messages", api_key=api_key, method="POST", body=b'{"message": "hello"}'
    )

    assert (status, body["error"]["code"]) == (400, "invalid_path")
    assert await astored_counts() == NOTHING


@pytest.mark.django_db(transaction=True)
async def test_an_encoded_slash_in_a_user_id_is_400(api_key: str) -> None:
    status, _, body = await _asgi(
        b"/api/users/a%2Fb/messages", api_key=api_key, method="POST", body=b'{"message": "hello"}'
    )

    assert status == 400
    assert body == {
        "error": {
            "code": "invalid_path",
            "message": "a path segment holds an encoded '/' (%2F); user ids cannot contain '/'",
        }
    }
    assert await astored_counts() == NOTHING


@pytest.mark.django_db(transaction=True)
async def test_percent_encoded_utf8_user_ids_are_the_decoded_string(api_key: str, celery_worker) -> None:
    status, _, body = await _asgi(
        b"/api/users/j%C3%BCrgen%20k/messages",
        api_key=api_key,
        method="POST",
        body=b'{"message": "hello", "wait_seconds": 0}',
    )

    assert status == 202
    assert body["user_id"] == "jürgen k"
    assert await EndUser.objects.filter(external_id="jürgen k").aexists()
    await turn_settled(body["message_id"])


@pytest.mark.django_db
def test_a_user_id_with_a_slash_is_refused_everywhere(api_key: str) -> None:
    from agentflow.errors import InvalidInput
    from agentflow.validation import clean_user_id

    with pytest.raises(InvalidInput, match="user_id must not contain '/'"):
        clean_user_id("team/alice")
    response = Client().get("/api/users/team/alice/sessions", headers={"X-API-Key": api_key})

    assert response.status_code == 404
    assert response.json() == {
        "error": {"code": "not_found", "message": "no API route matches GET /api/users/team/alice/sessions"}
    }


# --- every /api error is JSON; nothing is cached -------------------------------------------------


@pytest.mark.django_db
def test_an_unknown_api_route_is_a_json_404(api_key: str) -> None:
    response = Client().get("/api/nothing-here", headers={"X-API-Key": api_key})

    assert response.status_code == 404
    assert response["Content-Type"].startswith("application/json")
    assert response.json() == {
        "error": {"code": "not_found", "message": "no API route matches GET /api/nothing-here"}
    }


@pytest.mark.django_db
def test_a_wrong_method_is_a_json_405(api_key: str) -> None:
    response = Client().put("/api/users/alice/messages", headers={"X-API-Key": api_key})

    assert response.status_code == 405
    assert response.json() == {
        "error": {"code": "method_not_allowed", "message": "PUT is not allowed here; allowed: POST"}
    }
    assert response["Allow"] == "POST"
    assert stored_counts() == NOTHING


@pytest.mark.django_db
def test_pages_outside_the_api_keep_their_html_404() -> None:
    response = Client().get("/no-such-page/")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


@pytest.mark.django_db
@pytest.mark.parametrize(
    "path", ["/api/users/alice/export", "/api/users/alice/threads", "/api/users/nobody/sessions"]
)
def test_api_answers_are_never_cached(api_key: str, path: str) -> None:
    MessageFactory(thread__session__user__external_id="alice")

    response = Client().get(path, headers={"X-API-Key": api_key})

    assert response.status_code in (200, 404)
    assert response["Cache-Control"] == "no-store"


@pytest.mark.django_db
@pytest.mark.parametrize("value", ["true", "false"])
def test_wait_seconds_refuses_true_and_false(api_key: str, value: str) -> None:
    response = _post(Client(), api_key, '{"message": "hello", "wait_seconds": ' + value + "}")

    assert response.status_code == 422
    assert response.json() == {
        "error": {
            "code": "invalid_request",
            "message": "wait_seconds: Value error, must be a number, not true/false",
            "field": "wait_seconds",
        }
    }
    assert stored_counts() == NOTHING
