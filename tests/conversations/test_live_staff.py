"""The admin's live conversation view: the staff WebSocket (watch, claim, reply, hand back) and the page."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.contrib.auth.models import Permission
from django.contrib.staticfiles import finders
from django.test import Client

from agentflow_project.asgi import application
from conversations.consumers import CLOSE_FORBIDDEN, CLOSE_NOT_FOUND
from conversations.events import apublish
from conversations.frames import MAX_FRAME_BYTES
from conversations.handoff import BOT_BACK_TEXT, STAFF_REPLY_MAX_CHARS, escalation_claim, escalation_open
from conversations.models import AuditEvent, EndUser, Escalation, Message, Thread
from memory.privacy import user_erase
from tests.conftest import ORIGIN

from .factories import EndUserFactory, MessageFactory, ThreadFactory
from .helpers import astored_counts, chat_socket

pytestmark = pytest.mark.django_db(transaction=True)

ASK = "I want to speak to a manager"
JOINED = "A member of our team (Dana) has joined the conversation."
TURN_TIMEOUT = 20


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_superuser(
        "ops", "ops@example.com", "ops-password-123", first_name="Dana"
    )


@pytest.fixture
def other_staff(django_user_model):
    """A staff member with the rights to watch and act, who is not a superuser."""
    sam = django_user_model.objects.create_user("sam", "sam@example.com", "sam-password-123", is_staff=True)
    sam.user_permissions.set(
        Permission.objects.filter(
            codename__in=["view_enduser", "change_escalation"], content_type__app_label="conversations"
        )
    )
    return sam


def _session_headers(user: Any) -> list[tuple[bytes, bytes]]:
    client = Client()
    client.force_login(user)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"
    return [ORIGIN, (b"cookie", cookie.encode())]


def _escalated_thread(external_id: str) -> tuple[Thread, Escalation]:
    thread = ThreadFactory(session__user__external_id=external_id, topic=ASK)
    asked = MessageFactory(thread=thread, content=ASK)
    return thread, escalation_open(thread=thread, message=asked, reason="the user asked for a human")


class _ClaimTime:
    """Equal to an ISO timestamp at or after ``after`` (when the escalation was claimed)."""

    def __init__(self, after: datetime) -> None:
        self.after = after

    def __eq__(self, other: object) -> bool:
        return isinstance(other, str) and datetime.fromisoformat(other) >= self.after

    def __repr__(self) -> str:
        return f"<a claim time after {self.after.isoformat()}>"


def _escalation_row(
    escalation: Escalation, *, status: str, holder: str | None, held_by_me: bool
) -> dict[str, Any]:
    return {
        "id": escalation.pk,
        "thread_id": str(escalation.thread_id),
        "topic": ASK,
        "status": status,
        "reason": "the user asked for a human",
        "holder": holder,
        "held_by_me": held_by_me,
        "may_act": True,
        "created_at": escalation.created_at.isoformat(),
        "claimed_at": _ClaimTime(escalation.created_at) if status == "claimed" else None,
    }


def _staff_communicator(user_pk: int, headers: list[tuple[bytes, bytes]]) -> WebsocketCommunicator:
    return WebsocketCommunicator(application, f"/ws/staff/users/{user_pk}/", headers=headers)


async def _watch(staff_user: Any, end_user: EndUser) -> tuple[WebsocketCommunicator, list[dict[str, Any]]]:
    """Connect a staff page to ``end_user``'s conversation; returns it and its first escalation list."""
    communicator = _staff_communicator(end_user.pk, await sync_to_async(_session_headers)(staff_user))
    connected, _ = await communicator.connect()
    assert connected
    assert await communicator.receive_json_from() == {
        "type": "ready",
        "protocol": 1,
        "user_id": end_user.external_id,
        "user_pk": end_user.pk,
        "may_act": True,
    }
    escalations = await communicator.receive_json_from()
    assert escalations["type"] == "escalations"
    return communicator, escalations["escalations"]


async def _next_of(communicator: WebsocketCommunicator, kind: str, wait: float = 5) -> dict[str, Any]:
    """The next frame of type ``kind``, passing over others (the widget's own protocol may add frames)."""
    for _ in range(20):
        frame = await communicator.receive_json_from(timeout=wait)
        if frame["type"] == kind:
            return frame
    raise AssertionError(f"no {kind} frame")


def _message_fields(frame: dict[str, Any]) -> tuple[str, str, str, str]:
    return frame["type"], frame["id"], frame["role"], frame["content"]


# --- watching ------------------------------------------------------------------------------------


async def test_staff_page_receives_every_event_of_the_users_conversation_and_no_one_elses(staff) -> None:
    alice = await sync_to_async(EndUserFactory)(external_id="alice")
    bob = await sync_to_async(EndUserFactory)(external_id="bob")
    page, escalations = await _watch(staff, alice)
    assert escalations == []
    events = [
        {"kind": "user_message", "id": "m-1", "role": "user", "content": "Where is my order?"},
        {"kind": "typing", "role": "user", "state": True},
        {"kind": "typing", "role": "assistant", "state": True, "message_id": "m-1"},
        {"kind": "delta", "message_id": "m-1", "seq": 0, "text": "Your order "},
        {"kind": "thread", "event": "new_topic", "thread_id": "t-1", "status": "open", "topic": "order"},
        {"kind": "turn", "turn": {"status": "done", "message_id": "m-1", "content": "Your order shipped."}},
        {"kind": "seen", "message_id": "r-1"},
        {"kind": "error", "code": "llm_error", "message": "The assistant is unavailable right now."},
    ]

    await apublish(
        user_pk=bob.pk, event={"kind": "user_message", "id": "b-1", "role": "user", "content": "bob"}
    )
    for event in events:
        await apublish(user_pk=alice.pk, event=event)

    assert [await page.receive_json_from() for _ in events] == [
        {"type": "user_message", "id": "m-1", "role": "user", "content": "Where is my order?"},
        {"type": "typing", "role": "user", "state": True},
        {"type": "typing", "role": "assistant", "state": True, "message_id": "m-1"},
        {"type": "delta", "message_id": "m-1", "seq": 0, "text": "Your order "},
        {"type": "thread", "event": "new_topic", "thread_id": "t-1", "status": "open", "topic": "order"},
        {"type": "turn", "status": "done", "message_id": "m-1", "content": "Your order shipped."},
        {"type": "seen", "message_id": "r-1"},
        {"type": "error", "code": "llm_error", "message": "The assistant is unavailable right now."},
    ]
    assert await page.receive_nothing(timeout=0.3)
    await page.disconnect()


async def test_a_message_from_the_widget_and_its_reply_reach_the_staff_page(celery_worker, staff) -> None:
    alice = await sync_to_async(EndUserFactory)(external_id="alice")
    page, _ = await _watch(staff, alice)
    widget = await chat_socket("alice")

    await widget.send_json_to(
        {"type": "message", "client_message_id": "c-1", "message": "Where is my order?"}
    )

    turn = await _next_of(page, "turn", wait=TURN_TIMEOUT)
    asked = await Message.objects.aget(user=alice, role="user")
    reply = await Message.objects.aget(user=alice, role="assistant")
    assert asked.content == "Where is my order?"
    assert (turn["message_id"], turn["reply_id"], turn["content"], turn["thread_id"]) == (
        str(asked.pk),
        str(reply.pk),
        reply.content,
        str(asked.thread_id),
    )
    await _next_of(widget, "turn", wait=TURN_TIMEOUT)
    await widget.disconnect()
    await page.disconnect()


async def test_resume_sends_what_the_page_missed(staff) -> None:
    thread, _ = await sync_to_async(_escalated_thread)("alice")
    bob_thread, _ = await sync_to_async(_escalated_thread)("bob")
    first = await Message.objects.aget(thread=thread)
    later = await sync_to_async(MessageFactory)(thread=thread, role="assistant", content="A human will join.")
    bob_message = await Message.objects.aget(thread=bob_thread)
    alice = await EndUser.objects.aget(external_id="alice")
    page, _ = await _watch(staff, alice)

    await page.send_json_to({"type": "resume", "after": str(first.pk)})
    history = await page.receive_json_from()
    assert (history["type"], history["complete"]) == ("history", True)
    assert [(m["id"], m["role"], m["content"]) for m in history["messages"]] == [
        (str(later.pk), "assistant", "A human will join.")
    ]

    await page.send_json_to({"type": "resume", "after": None})
    history = await page.receive_json_from()
    assert [m["id"] for m in history["messages"]] == [str(first.pk), str(later.pk)]

    await page.send_json_to({"type": "resume", "after": str(bob_message.pk)})
    assert await page.receive_json_from() == {
        "type": "error",
        "code": "not_found",
        "message": f"message {bob_message.pk} not found for this user",
        "field": "after",
    }
    await page.send_json_to({"type": "resume", "after": 5})
    assert await page.receive_json_from() == {
        "type": "error",
        "code": "bad_frame",
        "message": "'after' must be a message id or null",
        "field": "after",
    }
    await page.disconnect()


# --- taking over -----------------------------------------------------------------------------------


async def test_staff_claim_reply_release_and_hand_back_reach_the_widget_live(staff) -> None:
    thread, escalation = await sync_to_async(_escalated_thread)("alice")
    alice = await EndUser.objects.aget(external_id="alice")
    page, escalations = await _watch(staff, alice)
    widget = await chat_socket("alice")
    assert escalations == [_escalation_row(escalation, status="open", holder=None, held_by_me=False)]
    claimed = _escalation_row(escalation, status="claimed", holder="Dana", held_by_me=True)

    # Claim: the widget is told who joined; the page gets the notice and its new escalation list.
    await page.send_json_to({"type": "claim", "escalation_id": escalation.pk})

    assert await page.receive_json_from() == {
        "type": "ack",
        "action": "claim",
        "escalation_id": escalation.pk,
    }
    joined = await Message.objects.aget(thread=thread, role="system")
    assert joined.content == JOINED
    assert _message_fields(await _next_of(widget, "human_joined")) == (
        "human_joined",
        str(joined.pk),
        "system",
        JOINED,
    )
    assert _message_fields(await page.receive_json_from()) == (
        "human_joined",
        str(joined.pk),
        "system",
        JOINED,
    )
    assert await page.receive_json_from() == {"type": "escalations", "escalations": [claimed]}
    assert await page.receive_json_from() == {"type": "escalations", "escalations": [claimed]}
    await escalation.arefresh_from_db()
    assert (escalation.status, escalation.holder_id) == ("claimed", staff.pk)

    # Typing, then a reply: stored as a human agent's message and shown in the widget.
    await page.send_json_to({"type": "typing", "state": True})
    assert await _next_of(widget, "typing") == {"type": "typing", "role": "human_agent", "state": True}
    assert await page.receive_json_from() == {"type": "typing", "role": "human_agent", "state": True}

    await page.send_json_to({"type": "reply", "thread_id": str(thread.pk), "content": "  Hi, Dana here.  "})

    ack = await page.receive_json_from()
    reply = await Message.objects.aget(thread=thread, role="human_agent")
    assert (reply.content, reply.user_id, reply.status) == ("Hi, Dana here.", alice.pk, "done")
    assert ack == {"type": "ack", "action": "reply", "message_id": str(reply.pk), "thread_id": str(thread.pk)}
    human = await _next_of(widget, "human_message")
    assert _message_fields(human) == ("human_message", str(reply.pk), "human_agent", "Hi, Dana here.")
    assert human["thread_id"] == str(thread.pk)
    assert _message_fields(await page.receive_json_from()) == (
        "human_message",
        str(reply.pk),
        "human_agent",
        "Hi, Dana here.",
    )

    # Release: back in the queue, nothing said to the user; the bot stays silent meanwhile.
    await page.send_json_to({"type": "release", "escalation_id": escalation.pk})

    assert await page.receive_json_from() == {
        "type": "ack",
        "action": "release",
        "escalation_id": escalation.pk,
    }
    assert await page.receive_json_from() == {
        "type": "escalations",
        "escalations": [_escalation_row(escalation, status="open", holder=None, held_by_me=False)],
    }
    await escalation.arefresh_from_db()
    assert (escalation.status, escalation.holder_id) == ("open", None)

    # Hand back: the widget hears the bot is back; the escalation is resolved and leaves the list.
    await page.send_json_to({"type": "hand_back", "escalation_id": escalation.pk})

    assert await page.receive_json_from() == {
        "type": "ack",
        "action": "hand_back",
        "escalation_id": escalation.pk,
    }
    back = await Message.objects.aget(thread=thread, content=BOT_BACK_TEXT)
    assert _message_fields(await _next_of(widget, "bot_back")) == (
        "bot_back",
        str(back.pk),
        "system",
        BOT_BACK_TEXT,
    )
    assert _message_fields(await page.receive_json_from()) == (
        "bot_back",
        str(back.pk),
        "system",
        BOT_BACK_TEXT,
    )
    assert await page.receive_json_from() == {"type": "escalations", "escalations": []}
    assert await page.receive_json_from() == {"type": "escalations", "escalations": []}
    await escalation.arefresh_from_db()
    assert (escalation.status, escalation.holder_id) == ("resolved", staff.pk)
    assert await page.receive_nothing(timeout=0.3)
    await widget.disconnect()
    await page.disconnect()


async def test_a_second_staff_page_sees_the_claim_and_cannot_take_over(staff, other_staff) -> None:
    thread, escalation = await sync_to_async(_escalated_thread)("alice")
    alice = await EndUser.objects.aget(external_id="alice")
    dana, _ = await _watch(staff, alice)
    sam, _ = await _watch(other_staff, alice)

    await dana.send_json_to({"type": "claim", "escalation_id": escalation.pk})
    assert [(await dana.receive_json_from())["type"] for _ in range(4)] == [
        "ack",
        "human_joined",
        "escalations",
        "escalations",
    ]
    assert (await _next_of(sam, "human_joined"))["content"] == JOINED
    seen_by_sam = _escalation_row(escalation, status="claimed", holder="Dana", held_by_me=False)
    assert await sam.receive_json_from() == {
        "type": "escalations",
        "escalations": [{**seen_by_sam, "may_act": False}],
    }
    await sam.receive_json_from()  # the same list again, from the staff group
    before = await astored_counts()

    refusals = [
        (
            {"type": "claim", "escalation_id": escalation.pk},
            {"code": "conflict", "message": "this escalation is already claimed by Dana"},
        ),
        (
            {"type": "release", "escalation_id": escalation.pk},
            {"code": "forbidden", "message": "this escalation is held by Dana; only they can release it"},
        ),
        (
            {"type": "hand_back", "escalation_id": escalation.pk},
            {"code": "forbidden", "message": "this escalation is held by Dana; only they can hand it back"},
        ),
    ]
    for frame, error in refusals:
        await sam.send_json_to(frame)
        assert await sam.receive_json_from() == {
            "type": "error",
            **error,
            "action": frame["type"],
            "escalation_id": escalation.pk,
        }
    await sam.send_json_to({"type": "reply", "thread_id": str(thread.pk), "content": "Sam here"})
    assert await sam.receive_json_from() == {
        "type": "error",
        "code": "forbidden",
        "message": "this thread is held by Dana; only they can reply",
        "action": "reply",
        "field": "thread_id",
    }

    assert await astored_counts() == before
    await escalation.arefresh_from_db()
    assert (escalation.status, escalation.holder_id) == ("claimed", staff.pk)
    assert await dana.receive_nothing(timeout=0.3)
    await dana.disconnect()
    await sam.disconnect()


async def test_a_reply_before_claiming_is_refused_and_not_stored(staff) -> None:
    thread, _ = await sync_to_async(_escalated_thread)("alice")
    alice = await EndUser.objects.aget(external_id="alice")
    page, _ = await _watch(staff, alice)
    before = await astored_counts()

    await page.send_json_to({"type": "reply", "thread_id": str(thread.pk), "content": "Hello"})

    assert await page.receive_json_from() == {
        "type": "error",
        "code": "forbidden",
        "message": "claim this escalation before replying",
        "action": "reply",
        "field": "thread_id",
    }
    assert await astored_counts() == before
    await page.disconnect()


# --- refusals ------------------------------------------------------------------------------------


@pytest.mark.parametrize("who", ["anonymous", "not-staff", "staff-without-rights", "inactive-staff"])
async def test_anyone_but_staff_is_refused_with_4403_and_nothing_changes(who: str, django_user_model) -> None:
    _, escalation = await sync_to_async(_escalated_thread)("alice")
    alice = await EndUser.objects.aget(external_id="alice")
    headers = [ORIGIN]
    if who != "anonymous":
        user = await sync_to_async(django_user_model.objects.create_user)(
            "eve", "eve@example.com", "eve-password-123", is_staff=who != "not-staff"
        )
        headers = await sync_to_async(_session_headers)(user)
        if who == "inactive-staff":
            user.is_superuser, user.is_active = True, False
            await user.asave()
    before = await astored_counts()
    page = _staff_communicator(alice.pk, headers)

    connected, _ = await page.connect()

    assert connected is True  # accepted so that the close code reaches the page
    assert await page.receive_json_from() == {
        "type": "error",
        "code": "forbidden",
        "message": "staff only: log in to the admin",
    }
    assert await page.receive_output() == {"type": "websocket.close", "code": CLOSE_FORBIDDEN}
    await apublish(user_pk=alice.pk, event={"kind": "user_message", "id": "m-1", "content": "secret"})
    assert await page.receive_nothing(timeout=0.3)
    assert await astored_counts() == before
    await escalation.arefresh_from_db()
    assert (escalation.status, escalation.holder_id) == ("open", None)
    await page.disconnect()


async def test_an_unknown_end_user_is_closed_4404(staff) -> None:
    page = _staff_communicator(999_999, await sync_to_async(_session_headers)(staff))

    connected, _ = await page.connect()

    assert connected is True
    assert await page.receive_json_from() == {
        "type": "error",
        "code": "not_found",
        "message": "no such end user",
    }
    assert await page.receive_output() == {"type": "websocket.close", "code": CLOSE_NOT_FOUND}
    await page.disconnect()


async def test_another_sites_origin_cannot_open_the_staff_socket(staff) -> None:
    alice = await sync_to_async(EndUserFactory)(external_id="alice")
    headers = [h for h in await sync_to_async(_session_headers)(staff) if h != ORIGIN]
    page = _staff_communicator(alice.pk, [*headers, (b"origin", b"https://evil.example")])

    connected, _ = await page.connect()

    assert connected is True  # accepted so that the close code reaches the page
    assert (await page.receive_json_from())["code"] == "origin_not_allowed"
    assert await page.receive_output() == {"type": "websocket.close", "code": CLOSE_FORBIDDEN}
    await page.disconnect()


async def test_bad_frames_get_error_frames_store_nothing_and_keep_the_connection(staff) -> None:
    thread, escalation = await sync_to_async(_escalated_thread)("alice")
    bob_thread, bob_escalation = await sync_to_async(_escalated_thread)("bob")
    alice = await EndUser.objects.aget(external_id="alice")
    await sync_to_async(escalation_claim)(escalation=escalation, staff_user=staff)  # replies would be allowed
    page, _ = await _watch(staff, alice)
    before = await astored_counts()
    too_long = "x" * (STAFF_REPLY_MAX_CHARS + 1)
    cases: list[tuple[dict[str, Any], dict[str, Any]]] = [
        ({"text_data": "{not json"}, {"code": "bad_json", "message": "the frame is not valid JSON"}),
        (
            {"text_data": "[1, 2]"},
            {"code": "bad_frame", "message": "a frame must be a JSON object with a 'type'"},
        ),
        ({"bytes_data": b'{"type": "ping"}'}, {"code": "bad_frame", "message": "send JSON text frames"}),
        (
            {
                "text_data": json.dumps(
                    {"type": "reply", "thread_id": str(thread.pk), "content": "x" * MAX_FRAME_BYTES}
                )
            },
            {"code": "frame_too_large", "message": f"frames are limited to {MAX_FRAME_BYTES} bytes"},
        ),
        (
            {"text_data": json.dumps({"type": "message", "message": "hi"})},
            {
                "code": "unknown_type",
                "message": "unknown frame type 'message'; expected one of: reply, claim, release,"
                " hand_back, typing, resume, ping",
            },
        ),
        (
            {"text_data": json.dumps({"type": "reply", "thread_id": str(thread.pk), "content": " \n "})},
            {
                "code": "invalid_input",
                "message": "message must not be empty",
                "action": "reply",
                "field": "content",
            },
        ),
        (
            {"text_data": json.dumps({"type": "reply", "thread_id": str(thread.pk), "content": too_long})},
            {
                "code": "invalid_input",
                "action": "reply",
                "field": "content",
                "message": f"message is {len(too_long)} characters; the limit is {STAFF_REPLY_MAX_CHARS}"
                " (input_config.max_message_chars)",
            },
        ),
        (
            {"text_data": json.dumps({"type": "reply", "thread_id": str(thread.pk), "content": 7})},
            {
                "code": "bad_frame",
                "message": "'content' must be a string",
                "action": "reply",
                "field": "content",
            },
        ),
        (
            {"text_data": json.dumps({"type": "reply", "content": "hi"})},
            {
                "code": "bad_frame",
                "message": "'thread_id' must be a string",
                "action": "reply",
                "field": "thread_id",
            },
        ),
        (
            {"text_data": json.dumps({"type": "reply", "thread_id": str(bob_thread.pk), "content": "hi"})},
            {
                "code": "not_found",
                "message": f"thread {bob_thread.pk} not found for this user",
                "action": "reply",
                "field": "thread_id",
            },
        ),
        (
            {"text_data": json.dumps({"type": "reply", "thread_id": "nope", "content": "hi"})},
            {
                "code": "not_found",
                "message": "thread 'nope' not found",
                "action": "reply",
                "field": "thread_id",
            },
        ),
        (
            {"text_data": json.dumps({"type": "hand_back", "escalation_id": bob_escalation.pk})},
            {
                "code": "not_found",
                "message": f"escalation {bob_escalation.pk} not found for this user",
                "action": "hand_back",
            },
        ),
        (
            {"text_data": json.dumps({"type": "claim", "escalation_id": 999_999})},
            {"code": "not_found", "message": "escalation 999999 not found for this user", "action": "claim"},
        ),
        (
            {"text_data": json.dumps({"type": "claim", "escalation_id": 10**30})},
            {
                "code": "not_found",
                "message": f"escalation {10**30} not found for this user",
                "action": "claim",
            },
        ),
        (
            {"text_data": json.dumps({"type": "release", "escalation_id": "abc"})},
            {"code": "not_found", "message": "escalation 'abc' not found for this user", "action": "release"},
        ),
        (
            {"text_data": json.dumps({"type": "release", "escalation_id": [1]})},
            {
                "code": "bad_frame",
                "message": "'escalation_id' must be an escalation's id",
                "action": "release",
                "field": "escalation_id",
            },
        ),
        (
            {"text_data": json.dumps({"type": "typing", "state": "yes"})},
            {"code": "bad_frame", "message": "'state' must be true or false", "field": "state"},
        ),
    ]

    for frame, error in cases:
        await page.send_to(**frame)
        assert await page.receive_json_from() == {"type": "error", **error}

    await page.send_json_to({"type": "ping"})
    assert await page.receive_json_from() == {"type": "pong"}
    assert await astored_counts() == before
    statuses = [(e.pk, e.status) async for e in Escalation.objects.order_by("pk")]
    assert statuses == [(escalation.pk, "claimed"), (bob_escalation.pk, "open")]
    await page.disconnect()


# --- the page ------------------------------------------------------------------------------------


def test_the_live_page_shows_the_conversation_to_staff(staff) -> None:
    thread, escalation = _escalated_thread("alice")
    MessageFactory(thread=thread, role="assistant", content="<script>alert(1)</script> a human will join")
    client = Client()
    client.force_login(staff)

    response = client.get(f"/admin/conversations/enduser/{thread.user_id}/live/")

    assert response.status_code == 200
    page = response.content.decode()
    assert ASK in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt; a human will join" in page
    assert "<script>alert(1)" not in page
    assert "/static/agentflow/live.js" in page
    assert response.context["live_config"] == {
        "wsPath": f"/ws/staff/users/{thread.user_id}/",
        "userPk": thread.user_id,
        "maxChars": STAFF_REPLY_MAX_CHARS,
        "mayAct": True,
        "timeZone": "UTC",
    }
    assert [m.content for m in response.context["recent_messages"]] == [
        ASK,
        "<script>alert(1)</script> a human will join",
    ]
    assert finders.find("agentflow/live.js")

    live_url = f'href="/admin/conversations/enduser/{thread.user_id}/live/"'
    for changelist in ("enduser", "thread", "escalation"):
        assert live_url in client.get(f"/admin/conversations/{changelist}/").content.decode()
    assert live_url in client.get(f"/admin/conversations/escalation/{escalation.pk}/change/").content.decode()


def test_the_live_page_is_refused_to_anyone_but_staff(django_user_model, other_staff) -> None:
    thread, _ = _escalated_thread("alice")
    url = f"/admin/conversations/enduser/{thread.user_id}/live/"
    user = django_user_model.objects.create_user("eve", "eve@example.com", "eve-password-123")
    no_rights = django_user_model.objects.create_user(
        "max", "max@example.com", "max-password-123", is_staff=True
    )
    client = Client()

    assert client.get(url).status_code == 302  # to the admin login
    client.force_login(user)
    response = client.get(url)
    assert (response.status_code, response["Location"].split("?")[0]) == (302, "/admin/login/")
    client.force_login(no_rights)
    assert client.get(url).status_code == 403
    client.force_login(other_staff)
    assert client.get(url).status_code == 200
    assert client.get("/admin/conversations/enduser/999999/live/").status_code == 404


# --- audit trail and erase ------------------------------------------------------------------------


async def test_staff_actions_over_the_socket_are_audited_with_account_and_route(staff, other_staff) -> None:
    thread, escalation = await sync_to_async(_escalated_thread)("alice")
    end_user = await EndUser.objects.aget(external_id="alice")
    page, _ = await _watch(staff, end_user)
    intruder, _ = await _watch(other_staff, end_user)

    await page.send_json_to({"type": "claim", "escalation_id": escalation.pk})
    await _next_of(page, "ack")
    await intruder.send_json_to({"type": "release", "escalation_id": escalation.pk})  # not theirs
    assert (await _next_of(intruder, "error"))["code"] == "forbidden"
    await page.send_json_to({"type": "reply", "thread_id": str(thread.pk), "content": "Hi, Dana here"})
    await _next_of(page, "ack")

    rows = [
        (e.action, e.actor_kind, e.staff_username, e.subject, e.route)
        async for e in AuditEvent.objects.exclude(action=AuditEvent.Action.LOGIN).order_by("id")
    ]
    path = f"/ws/staff/users/{end_user.pk}/"
    assert rows == [
        ("escalation_claim", "staff", "ops", "alice", f"WS {path} claim"),
        ("staff_reply", "staff", "ops", "alice", f"WS {path} reply"),
    ]
    for communicator in (page, intruder):
        await communicator.disconnect()


async def test_a_staff_page_watching_an_erased_user_is_closed_4404(staff) -> None:
    end_user = await sync_to_async(EndUserFactory)(external_id="alice")
    page, _ = await _watch(staff, end_user)

    await sync_to_async(user_erase)(user=end_user)

    assert await page.receive_json_from() == {
        "type": "error",
        "code": "not_found",
        "message": "this end user was erased",
    }
    assert await page.receive_output() == {"type": "websocket.close", "code": CLOSE_NOT_FOUND}
