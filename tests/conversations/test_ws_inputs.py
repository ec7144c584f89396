"""Hostile frames on both WebSockets (issue 12): lone surrogates and JSON nested thousands deep get an
``error`` frame, the connection stays open, and nothing is stored."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.test import Client

from agentflow_project.asgi import application
from conversations.chat_tokens import chat_token_create
from conversations.frames import MAX_FRAME_DEPTH
from conversations.models import EndUser
from tests.conftest import ORIGIN

from .factories import MessageFactory
from .helpers import astored_counts

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

SURROGATE = {
    "type": "error",
    "code": "bad_json",
    "message": "the frame holds a lone surrogate (\\ud800-\\udfff); strings must be valid Unicode",
}
TOO_DEEP = {
    "type": "error",
    "code": "bad_json",
    "message": f"the frame is nested deeper than {MAX_FRAME_DEPTH} levels",
}


def _deep(depth: int) -> str:
    return '{"type": "message", "message": "hi", "x": ' + "[" * depth + "]" * depth + "}"


HOSTILE = [
    ('{"type": "message", "message": "hi \\ud800", "client_message_id": "c-1"}', SURROGATE),
    ('{"type": "message", "message": "hi", "client_message_id": "\\udc00"}', SURROGATE),
    ('{"type": "\\ud800"}', SURROGATE),
    ('{"\\ud800": 1, "type": "ping"}', SURROGATE),
    (_deep(2_000), TOO_DEEP),  # 4 KB: far under the 64 KiB frame limit
    (_deep(MAX_FRAME_DEPTH), TOO_DEEP),
]
IDS = ["message", "client-id", "type", "key", "2000-deep", "just-too-deep"]


async def _chat(user_id: str) -> WebsocketCommunicator:
    token = chat_token_create(external_id=user_id)
    communicator = WebsocketCommunicator(application, f"/ws/chat/?token={token}", headers=[ORIGIN])
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from())["type"] == "ready"
    return communicator


def _staff_headers() -> list[tuple[bytes, bytes]]:
    from django.contrib.auth import get_user_model

    staff = get_user_model().objects.create_superuser("ops", "ops@example.com", "ops-password-123")
    client = Client()
    client.force_login(staff)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    return [ORIGIN, (b"cookie", cookie.encode())]


async def _staff(end_user: EndUser) -> WebsocketCommunicator:
    headers = await sync_to_async(_staff_headers)()
    communicator = WebsocketCommunicator(application, f"/ws/staff/users/{end_user.pk}/", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from())["type"] == "ready"
    assert (await communicator.receive_json_from())["type"] == "escalations"
    return communicator


async def _still_open(communicator: WebsocketCommunicator) -> None:
    await communicator.send_json_to({"type": "ping"})
    assert await communicator.receive_json_from() == {"type": "pong"}


@pytest.mark.parametrize(("text", "error"), HOSTILE, ids=IDS)
async def test_chat_answers_a_hostile_frame_with_an_error_and_stays_open(text: str, error: Any) -> None:
    alice = await _chat("alice")
    before = await astored_counts()

    await alice.send_to(text_data=text)

    assert await alice.receive_json_from() == error
    await _still_open(alice)
    assert await astored_counts() == before
    await alice.disconnect()


@pytest.mark.parametrize(("text", "error"), HOSTILE, ids=IDS)
async def test_staff_page_answers_a_hostile_frame_with_an_error_and_stays_open(text: str, error: Any) -> None:
    message = await sync_to_async(MessageFactory)(thread__session__user__external_id="alice")
    end_user = await EndUser.objects.aget(pk=message.user_id)
    page = await _staff(end_user)
    before = await astored_counts()

    await page.send_to(text_data=text.replace('"message"', '"reply"', 1))

    assert await page.receive_json_from() == error
    await _still_open(page)
    assert await astored_counts() == before
    await page.disconnect()


async def test_a_frame_at_the_depth_limit_is_still_read() -> None:
    alice = await _chat("alice")
    nested = "[" * (MAX_FRAME_DEPTH - 1) + "]" * (MAX_FRAME_DEPTH - 1)

    await alice.send_to(text_data='{"type": "ping", "x": ' + nested + "}")

    assert await alice.receive_json_from() == {"type": "pong"}
    await alice.disconnect()
