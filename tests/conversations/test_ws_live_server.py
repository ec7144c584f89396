"""The chat protocol with a real WebSocket client (aiohttp) against daphne serving the project over TCP:
what a widget on another machine sees, including close codes on the wire."""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest
from asgiref.sync import sync_to_async

from agentflow.testing.fake_anthropic import FakeReply
from conversations.chat_tokens import chat_token_create
from conversations.models import Message
from tests.browser.conftest import live_asgi_url  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

TIMEOUT = 20


async def _open(session: aiohttp.ClientSession, base: str, token: str, origin: str | None = None) -> Any:
    ws = await session.ws_connect(
        base.replace("http", "ws") + f"/ws/chat/?token={token}", headers={"Origin": origin or base}
    )
    return ws


async def _frame(ws: Any) -> dict[str, Any]:
    message = await ws.receive(timeout=TIMEOUT)
    assert message.type == aiohttp.WSMsgType.TEXT, message
    return json.loads(message.data)


async def _until(ws: Any, kind: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    seen = []
    while True:
        frame = await _frame(ws)
        if frame["type"] == kind:
            return frame, seen
        seen.append(frame)


async def test_a_real_client_streams_resends_idempotently_and_resumes_after_a_drop(
    live_asgi_url,  # noqa: F811 (the imported fixture)
    celery_worker,
    fake_llm,
    django_user_model,
) -> None:
    from conversations.handoff import escalation_claim, escalation_open, staff_reply
    from conversations.models import Thread

    fake_llm.enqueue(FakeReply(text="Reset it from the sign-in page."))
    token = await sync_to_async(chat_token_create)(external_id="alice")
    async with aiohttp.ClientSession() as session:
        ws = await _open(session, live_asgi_url, token)
        assert (await _frame(ws))["type"] == "ready"
        frame = {"type": "message", "message": "My login is broken", "client_message_id": "w-1"}
        await ws.send_str(json.dumps(frame))
        ack = await _frame(ws)
        turn, before = await _until(ws, "turn")
        assert (ack["type"], ack["duplicate"]) == ("ack", False)
        assert "".join(f["text"] for f in before if f["type"] == "delta") == "Reset it from the sign-in page."
        assert turn["content"] == "Reset it from the sign-in page."

        # The network hiccups; the widget resends the same message: no second turn, the same reply.
        await ws.send_str(json.dumps(frame))
        again = await _frame(ws)
        while again["type"] == "typing":
            again = await _frame(ws)
        replay = await _frame(ws)
        assert (again["type"], again["message_id"], again["duplicate"]) == ("ack", ack["message_id"], True)
        assert (replay["type"], replay["reply_id"]) == ("turn", turn["reply_id"])
        assert len(fake_llm.requests) == 1
        await ws.close()

        # While the widget is gone, staff write.
        staff = await sync_to_async(django_user_model.objects.create_superuser)(
            "ops", "o@example.com", "pw-12345678"
        )
        thread = await Thread.objects.aget(pk=turn["thread_id"])

        def staff_writes() -> Message:
            escalation = escalation_open(thread=thread, message=None, reason="test")
            escalation_claim(escalation=escalation, staff_user=staff)
            return staff_reply(thread=thread, staff_user=staff, content="Checking your account now.")

        staff_message = await sync_to_async(staff_writes)()

        back = await _open(session, live_asgi_url, token)
        assert (await _frame(back))["type"] == "ready"
        await back.send_str(json.dumps({"type": "resume", "after": turn["reply_id"]}))
        history = await _frame(back)
        assert [(m["role"], m["content"]) for m in history["messages"]] == [
            ("system", "A member of our team (ops) has joined the conversation."),
            ("human_agent", "Checking your account now."),
        ]
        assert history["messages"][-1]["id"] == str(staff_message.pk)
        await back.close()
    assert await Message.objects.filter(role="user").acount() == 1


async def test_a_real_client_sees_the_close_codes_and_bad_frame_errors(live_asgi_url) -> None:  # noqa: F811
    token = await sync_to_async(chat_token_create)(external_id="alice")
    async with aiohttp.ClientSession() as session:
        forged = await _open(session, live_asgi_url, token + "x")
        assert (await _frame(forged))["code"] == "unauthorized"
        closing = await forged.receive(timeout=TIMEOUT)
        assert (closing.type, forged.close_code) == (aiohttp.WSMsgType.CLOSE, 4401)

        foreign = await _open(session, live_asgi_url, token, origin="https://evil.example")
        assert (await _frame(foreign))["code"] == "origin_not_allowed"
        await foreign.receive(timeout=TIMEOUT)
        assert foreign.close_code == 4403

        ws = await _open(session, live_asgi_url, token)
        assert (await _frame(ws))["type"] == "ready"
        await ws.send_str("{nope")
        assert (await _frame(ws))["code"] == "bad_json"
        await ws.send_bytes(b"\x00\x01")
        assert (await _frame(ws))["code"] == "bad_frame"
        await ws.send_str(json.dumps({"type": "message", "message": "x" * 70_000}))
        assert (await _frame(ws))["code"] == "frame_too_large"
        await ws.send_str(json.dumps({"type": "ping"}))
        assert await _frame(ws) == {"type": "pong"}  # still open after all that
        await ws.close()
    assert await Message.objects.acount() == 0
