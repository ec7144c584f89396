"""The embeddable widget's server side: the demo page, its token endpoint and the static script."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.staticfiles import finders
from django.test import Client

from agentflow_project.asgi import application
from conversations.chat_tokens import chat_token_user
from conversations.models import EndUser
from conversations.views import DEMO_USER_SESSION_KEY
from tests.conftest import ORIGIN

pytestmark = pytest.mark.django_db

DEMO_ID = re.compile(r"demo-[0-9a-f]{16}")
WIDGET = Path(finders.find("agentflow/widget.js"))


def _token(client: Client) -> dict:
    response = client.get("/demo/chat-token")
    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    return response.json()


def test_the_demo_page_embeds_the_widget_the_way_a_host_does() -> None:
    response = Client().get("/demo/")

    assert response.status_code == 200
    html = response.content.decode()
    tags = re.findall(r"<script [^>]*></script>", html)
    assert tags == [
        '<script src="/static/agentflow/widget.js" data-token-url="/demo/chat-token"'
        ' data-title="Acme support" defer></script>'
    ]


def test_each_browser_gets_its_own_demo_user_kept_in_its_session(settings) -> None:
    first, second = Client(), Client()

    body = _token(first)
    again = _token(first)
    other = _token(second)

    user = first.session[DEMO_USER_SESSION_KEY]
    assert DEMO_ID.fullmatch(user)
    assert set(body) == {"token", "expires_in", "websocket_path", "agent"}
    assert (body["expires_in"], body["websocket_path"]) == (
        settings.AGENTFLOW["CHAT_TOKEN_TTL_SECONDS"],
        "/ws/chat/",
    )
    assert chat_token_user(body["token"]) == user
    assert chat_token_user(again["token"]) == user
    assert chat_token_user(other["token"]) == second.session[DEMO_USER_SESSION_KEY] != user
    assert not EndUser.objects.exists()  # a token stores nothing; the user appears when they chat


def test_the_token_answer_is_never_cached() -> None:
    response = Client().get("/demo/chat-token")

    assert "no-store" in response["Cache-Control"]


@pytest.mark.parametrize(
    "stored", ["alice", "demo-", "demo-0123456789abcdeg", "demo-../../etc", 42, None, ""]
)
def test_a_session_value_that_is_not_a_demo_id_is_replaced_never_used(stored) -> None:
    client = Client()
    client.get("/demo/")  # a session cookie
    session = client.session
    session[DEMO_USER_SESSION_KEY] = stored
    session.save()

    body = _token(client)

    user = chat_token_user(body["token"])
    assert user != stored and DEMO_ID.fullmatch(user)
    assert client.session[DEMO_USER_SESSION_KEY] == user


@pytest.mark.parametrize("method", ["post", "put", "delete", "patch"])
def test_the_token_endpoint_answers_get_only(method) -> None:
    client = Client()

    response = getattr(client, method)("/demo/chat-token", data={"user": "alice"})

    assert response.status_code == 405
    assert DEMO_USER_SESSION_KEY not in client.session


def test_query_parameters_cannot_choose_the_user() -> None:
    client = Client()

    body = client.get("/demo/chat-token", {"user_id": "alice", "u": "alice"}).json()

    assert DEMO_ID.fullmatch(chat_token_user(body["token"]))


@pytest.mark.parametrize("path", ["/demo/", "/demo/chat-token"])
def test_the_demo_is_404_when_turned_off(settings, path) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "DEMO_PAGE": False}
    client = Client()

    response = client.get(path)

    assert response.status_code == 404
    assert DEMO_USER_SESSION_KEY not in client.session


def test_the_widget_script_is_served_as_javascript() -> None:
    response = Client().get("/static/agentflow/widget.js")

    assert response.status_code == 200
    assert response["Content-Type"].split(";")[0] in ("text/javascript", "application/javascript")
    assert b"".join(response.streaming_content) == WIDGET.read_bytes()


def test_the_widget_never_parses_html() -> None:
    """Text reaches the page through text nodes only: no HTML parsing sink anywhere in the script."""
    source = WIDGET.read_text()

    for sink in (
        "innerHTML",
        "outerHTML",
        "insertAdjacentHTML",
        "document.write",
        "eval(",
        "new Function",
        "createContextualFragment",
        "DOMParser",
        "srcdoc",
    ):
        assert sink not in source, sink


@pytest.mark.django_db(transaction=True)
async def test_a_demo_token_opens_the_chat_as_that_demo_user() -> None:
    client = Client()
    body = await sync_to_async(_token)(client)
    user = chat_token_user(body["token"])

    communicator = WebsocketCommunicator(application, f"/ws/chat/?token={body['token']}", headers=[ORIGIN])
    connected, _ = await communicator.connect()
    ready = await communicator.receive_json_from()
    await communicator.disconnect()

    assert connected
    assert (ready["type"], ready["user_id"]) == ("ready", user)


def test_the_demo_token_names_the_agent_the_widget_asks_for() -> None:
    from conversations.chat_tokens import chat_token_claims
    from conversations.models import Agent

    Agent.objects.create(name="shop")
    client = Client()

    shop = client.get("/demo/chat-token", {"agent": "shop"})
    default = client.get("/demo/chat-token")
    unknown = client.get("/demo/chat-token", {"agent": "nobody"})
    bad = client.get("/demo/chat-token", {"agent": "no such agent"})

    assert shop.status_code == 200 and shop.json()["agent"] == "shop"
    assert chat_token_claims(shop.json()["token"]).agent == "shop"
    assert default.json()["agent"] == "agentflow"
    assert unknown.status_code == 404 and unknown.json()["error"]["field"] == "agent"
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "invalid_input"
    assert not EndUser.objects.exists()  # a token stores nothing


def test_the_demo_page_puts_the_asked_agent_on_the_widget() -> None:
    from conversations.models import Agent

    Agent.objects.create(name="shop")

    page = Client().get("/demo/", {"agent": "shop"}).content.decode()

    assert re.findall(r"<script [^>]*></script>", page) == [
        '<script src="/static/agentflow/widget.js" data-token-url="/demo/chat-token" data-agent="shop"'
        ' data-title="Acme support" defer></script>'
    ]
    assert Client().get("/demo/", {"agent": "nobody"}).status_code == 404
