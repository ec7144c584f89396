"""Protocol v1 beyond a single turn (docs/protocol.md): streaming, resume after a reconnect, read
positions, typing, staff thread changes, and what one user can never see or touch of another's."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.utils import timezone

from agentflow.testing.fake_anthropic import FakeReply
from agentflow_project.asgi import application
from conversations.chat_tokens import chat_token_create
from conversations.events import user_group
from conversations.handoff import escalation_claim, escalation_open, staff_reply
from conversations.models import EndUser, Message, Thread
from conversations.services import thread_staff_resolve
from tests.conftest import ORIGIN

from .helpers import receive_until

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]
TURN_FRAMES = ("typing", "delta", "thread", "turn")

TURN_TIMEOUT = 20


async def _connect(user_id: str) -> WebsocketCommunicator:
    token = chat_token_create(external_id=user_id)
    communicator = WebsocketCommunicator(application, f"/ws/chat/?token={token}", headers=[ORIGIN])
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from())["type"] == "ready"
    return communicator


async def _turn(communicator: WebsocketCommunicator, text: str, client_id: str) -> tuple[dict, list[dict]]:
    await communicator.send_json_to({"type": "message", "message": text, "client_message_id": client_id})
    ack = await communicator.receive_json_from()
    assert ack["type"] == "ack", ack
    turn, before = await receive_until(communicator, "turn", timeout=TURN_TIMEOUT)
    assert await communicator.receive_json_from(timeout=TURN_TIMEOUT) == {
        "type": "typing",
        "role": "assistant",
        "state": False,
        "message_id": ack["message_id"],
    }
    return turn, before


async def test_a_slow_reply_streams_in_batched_ordered_deltas(celery_worker, fake_llm) -> None:
    text = "Open Settings, then Security, then choose Reset password and follow the email we send you."
    fake_llm.chunk_delay = 0.03  # one word every 30 ms: deltas are batched at most every ~50 ms
    fake_llm.enqueue(FakeReply(text=text))
    alice = await _connect("alice")

    turn, before = await _turn(alice, "How do I reset my password?", "c-1")

    deltas = [f for f in before if f["type"] == "delta"]
    words = len(text.split())
    assert 2 <= len(deltas) < words  # streamed in pieces, fewer frames than tokens
    assert [d["seq"] for d in deltas] == list(range(len(deltas)))
    assert {d["message_id"] for d in deltas} == {turn["message_id"]}
    assert "".join(d["text"] for d in deltas) == text == turn["content"]
    await alice.disconnect()


def billing_agent():
    """An agent whose replies the Confidence Evaluator judges (an intent, the LLM's self-assessment)."""
    from agentflow import AgentFrameworkBuilder, IntentCategory
    from agentflow.registry import default_backend

    return (
        AgentFrameworkBuilder()
        .with_intent_categories(
            [
                IntentCategory(
                    "BILLING",
                    "Invoices and charges",
                    ["Why was I charged twice?", "Where is my invoice?"],
                    threshold=0.7,
                ),
                IntentCategory(
                    "ORDERS", "Order status and delivery", ["Where is my order?", "Track my parcel"]
                ),
            ]
        )
        .with_config({"session_config": {"llm_thread_judgement": False}})
        .build_sync(default_backend())
    )


async def test_a_confident_reply_streams_and_a_doubtful_one_is_withheld_unstreamed(
    celery_worker, fake_llm, settings
) -> None:
    from agentflow.agent import HANDOFF_NOTICE
    from agentflow.registry import clear_agent_cache

    settings.AGENTFLOW = {**settings.AGENTFLOW, "AGENT_FACTORY": f"{__name__}.billing_agent"}
    clear_agent_cache()
    fake_llm.chunk_delay = 0.02
    fake_llm.enqueue(
        FakeReply(
            text="<confidence>0.95</confidence>\nYou were charged twice because the first payment was retried."
        ),
        FakeReply(text="<confidence>0.05</confidence>\nMaybe a bank error?"),
    )
    alice, bob = await _connect("alice"), await _connect("bob")

    sure, sure_frames = await _turn(alice, "Why was I charged twice?", "c-1")
    doubtful, doubtful_frames = await _turn(bob, "Why was I charged twice?", "c-1")

    answer = "You were charged twice because the first payment was retried."
    assert (sure["intent"], sure["content"], sure["escalated"]) == ("BILLING", answer, False)
    assert "".join(f["text"] for f in sure_frames if f["type"] == "delta") == answer
    assert (doubtful["intent"], doubtful["escalated"], doubtful["handled_by"]) == ("BILLING", True, "handoff")
    assert doubtful["content"] == HANDOFF_NOTICE
    # The draft never reached bob: what replaced it came whole, in one piece.
    assert [f["text"] for f in doubtful_frames if f["type"] == "delta"] == [HANDOFF_NOTICE]
    system = fake_llm.requests[0]["body"]["system"]
    assert "Begin your answer with <confidence>X</confidence>" in (
        system if isinstance(system, str) else system[0]["text"]
    )
    for communicator in (alice, bob):
        await communicator.disconnect()


async def test_after_a_reconnect_resume_sends_exactly_what_was_missed(
    celery_worker, fake_llm, django_user_model
) -> None:
    fake_llm.enqueue(FakeReply(text="First answer."), FakeReply(text="Second answer."))
    tab = await _connect("alice")
    first_turn, _ = await _turn(tab, "My login is broken", "c-1")
    await tab.disconnect()

    # While the widget is away: another device sends a message, and staff write.
    other_device = await _connect("alice")
    second_turn, _ = await _turn(other_device, "Still broken after the reset", "c-2")
    await other_device.disconnect()
    staff = await sync_to_async(django_user_model.objects.create_superuser)(
        "ops", "ops@example.com", "pw-123456789"
    )
    thread = await Thread.objects.aget(pk=first_turn["thread_id"])

    def staff_writes():
        escalation = escalation_open(thread=thread, message=None, reason="test")
        escalation_claim(escalation=escalation, staff_user=staff)
        return staff_reply(thread=thread, staff_user=staff, content="I'm looking at your account now.")

    staff_message = await sync_to_async(staff_writes)()

    back = await _connect("alice")
    await back.send_json_to({"type": "resume", "after": first_turn["reply_id"]})
    history = await back.receive_json_from()

    assert history["type"] == "history" and history["complete"] is True
    assert [(m["role"], m["content"]) for m in history["messages"]] == [
        ("user", "Still broken after the reset"),
        ("assistant", "Second answer."),
        ("system", "A member of our team (ops) has joined the conversation."),
        ("human_agent", "I'm looking at your account now."),
    ]
    assert history["messages"][0]["client_message_id"] == "c-2"
    assert history["messages"][1]["reply_to"] == second_turn["message_id"]
    assert history["messages"][-1]["id"] == str(staff_message.pk)

    # A fresh page (after: null) gets the latest messages, oldest first.
    await back.send_json_to({"type": "resume", "after": None})
    fresh = await back.receive_json_from()
    assert [m["content"] for m in fresh["messages"]][:2] == ["My login is broken", "First answer."]
    assert len(fresh["messages"]) == 6 and fresh["complete"] is True
    await back.disconnect()


async def test_resume_pages_long_histories(monkeypatch) -> None:
    from conversations import frames

    monkeypatch.setattr(frames, "HISTORY_LIMIT", 2)
    alice = await _connect("alice")
    user = await EndUser.objects.aget(external_id="alice")
    now = timezone.now()
    session = await sync_to_async(user.sessions.create)(ttl_seconds=60, last_activity_at=now, expires_at=now)
    ids = []
    for n in range(5):
        message = await Message.objects.acreate(user=user, session=session, role="user", content=f"m{n}")
        ids.append(str(message.pk))

    await alice.send_json_to({"type": "resume", "after": ids[0]})
    page = await alice.receive_json_from()
    await alice.send_json_to({"type": "resume", "after": page["messages"][-1]["id"]})
    second = await alice.receive_json_from()
    await alice.send_json_to({"type": "resume", "after": second["messages"][-1]["id"]})
    last = await alice.receive_json_from()

    assert ([m["content"] for m in page["messages"]], page["complete"]) == (["m1", "m2"], False)
    assert ([m["content"] for m in second["messages"]], second["complete"]) == (["m3", "m4"], True)
    assert (last["messages"], last["complete"]) == ([], True)
    await alice.disconnect()


async def test_one_user_can_never_resume_or_ack_with_another_users_messages(celery_worker, fake_llm) -> None:
    fake_llm.enqueue(FakeReply(text="Bob's answer."))
    bob = await _connect("bob")
    bob_turn, _ = await _turn(bob, "Where is my parcel?", "b-1")
    alice = await _connect("alice")

    await alice.send_json_to({"type": "resume", "after": bob_turn["reply_id"]})
    refused_resume = await alice.receive_json_from()
    await alice.send_json_to({"type": "ack", "message_id": bob_turn["reply_id"]})
    refused_ack = await alice.receive_json_from()
    await alice.send_json_to({"type": "resume", "after": None})
    own_history = await alice.receive_json_from()

    assert refused_resume == {
        "type": "error",
        "code": "not_found",
        "field": "after",
        "message": f"message {bob_turn['reply_id']} not found for this user",
    }
    assert refused_ack == {
        "type": "error",
        "code": "not_found",
        "field": "message_id",
        "message": f"message {bob_turn['reply_id']} not found for this user",
    }
    assert own_history == {"type": "history", "messages": [], "complete": True}
    assert await EndUser.objects.filter(last_read_message_id__isnull=False).acount() == 0
    assert await bob.receive_nothing(timeout=0.3)
    for communicator in (alice, bob):
        await communicator.disconnect()


async def test_ack_records_the_read_position_moving_forward_only_and_tells_staff(
    celery_worker, fake_llm
) -> None:
    fake_llm.enqueue(FakeReply(text="One."), FakeReply(text="Two."))
    alice = await _connect("alice")
    first, _ = await _turn(alice, "My login is broken", "c-1")
    second, _ = await _turn(alice, "It says my password expired", "c-2")
    user = await EndUser.objects.aget(external_id="alice")
    layer = get_channel_layer()
    staff_channel = await layer.new_channel()
    await layer.group_add(user_group(user.pk), staff_channel)

    await alice.send_json_to({"type": "ack", "message_id": second["reply_id"]})
    seen = await layer.receive(staff_channel)
    await alice.send_json_to({"type": "ack", "message_id": first["reply_id"]})  # older: ignored
    await layer.receive(staff_channel)

    await user.arefresh_from_db()
    assert seen["event"] == {"kind": "seen", "message_id": second["reply_id"]}
    assert str(user.last_read_message_id) == second["reply_id"]
    assert user.last_read_at is not None
    assert await alice.receive_nothing(timeout=0.3)  # read positions are for staff, not echoed
    await layer.group_discard(user_group(user.pk), staff_channel)
    await alice.disconnect()


async def test_user_typing_reaches_staff_but_not_the_users_own_tabs() -> None:
    alice = await _connect("alice")
    other_tab = await _connect("alice")
    user = await EndUser.objects.aget(external_id="alice")
    layer = get_channel_layer()
    staff_channel = await layer.new_channel()
    await layer.group_add(user_group(user.pk), staff_channel)

    await alice.send_json_to({"type": "typing", "state": True})
    event = await layer.receive(staff_channel)
    await alice.send_json_to({"type": "typing", "state": True})  # held: not passed on again so soon
    await alice.send_json_to({"type": "typing", "state": False})
    stopped = await layer.receive(staff_channel)

    assert event["event"] == {"kind": "typing", "role": "user", "state": True}
    assert stopped["event"] == {"kind": "typing", "role": "user", "state": False}
    assert await other_tab.receive_nothing(timeout=0.3)
    assert await alice.receive_nothing(timeout=0.1)
    await layer.group_discard(user_group(user.pk), staff_channel)
    for communicator in (alice, other_tab):
        await communicator.disconnect()


async def test_a_thread_staff_resolve_reaches_the_widget_as_a_thread_frame(
    celery_worker, fake_llm, django_user_model
) -> None:
    fake_llm.enqueue(FakeReply(text="Let me check."))
    alice = await _connect("alice")
    turn, _ = await _turn(alice, "My login is broken", "c-1")
    staff = await sync_to_async(django_user_model.objects.create_superuser)(
        "ops", "ops@example.com", "pw-123456789"
    )
    thread = await Thread.objects.aget(pk=turn["thread_id"])

    await sync_to_async(thread_staff_resolve)(thread=thread, staff_user=staff, note="fixed")

    assert await alice.receive_json_from(timeout=TURN_TIMEOUT) == {
        "type": "thread",
        "event": "resolved",
        "thread_id": turn["thread_id"],
        "status": "resolved",
        "topic": "My login is broken",
    }
    await alice.disconnect()


async def test_user_messages_from_rest_appear_live_on_the_users_sockets(api_key, celery_worker) -> None:
    from django.test import AsyncClient

    alice = await _connect("alice")
    response = await AsyncClient().post(
        "/api/users/alice/messages",
        {"message": "Hello from the app", "client_message_id": "r-1", "wait_seconds": 0},
        content_type="application/json",
        headers={"X-API-Key": api_key},
    )
    assert response.status_code == 202, response.content
    frame = await alice.receive_json_from(timeout=TURN_TIMEOUT)

    assert (frame["type"], frame["role"], frame["content"], frame["client_message_id"], frame["status"]) == (
        "user_message",
        "user",
        "Hello from the app",
        "r-1",
        "pending",
    )
    assert frame["id"] == response.json()["message_id"]
    assert uuid.UUID(frame["id"])
    # The turn runs in the worker (offline): wait for it, so it never outlives this test's data.
    turn, _ = await receive_until(alice, "turn", timeout=TURN_TIMEOUT)
    assert turn["message_id"] == frame["id"]
    await alice.disconnect()


async def test_the_sending_socket_shows_its_message_itself_and_the_users_other_sockets_get_it_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The socket that sent a message sends its ``user_message`` right after the ``ack``, and is left
    out of the announcement through Redis (which would only bring it back to its own process); the
    user's other sockets get it from there, each once (docs/protocol.md: "from this or another of
    the user's connections")."""
    from agentflow.channel_layer import RedisChannelLayer

    delivered: list[str] = []
    deliveries = RedisChannelLayer._deliveries

    def recording(self: RedisChannelLayer, members: Any, message: dict, *args: Any, **kwargs: Any) -> Any:
        found = deliveries(self, members, message, *args, **kwargs)
        if message.get("event", {}).get("kind") == "user_message":  # not a turn's events (a worker)
            delivered.extend(key for _, keys, _ in found for key in keys)
        return found

    monkeypatch.setattr(RedisChannelLayer, "_deliveries", recording)
    tab = await _connect("alice")

    async def frames(communicator: WebsocketCommunicator, count: int) -> list[dict]:
        """The next ``count`` frames that are not a turn's (a worker of this session may run it)."""
        got: list[dict] = []
        while len(got) < count:
            frame = await communicator.receive_json_from(timeout=5)
            if frame["type"] not in TURN_FRAMES and not (frame["type"] == "error" and "message_id" in frame):
                got.append(frame)
        return got

    async def send(client_id: str) -> dict:
        await tab.send_json_to(
            {"type": "message", "message": "Where is my order?", "client_message_id": client_id}
        )
        ack, shown = await frames(tab, 2)
        message = await Message.objects.aget(client_message_id=client_id)
        assert ack == {
            "type": "ack",
            "message_id": str(message.pk),
            "client_message_id": client_id,
            "duplicate": False,
        }
        assert (
            shown["type"],
            shown["id"],
            shown["content"],
            shown["client_message_id"],
            shown["status"],
        ) == (
            "user_message",
            str(message.pk),
            "Where is my order?",
            client_id,
            "pending",
        )
        return shown

    await send("c-1")
    assert delivered == []  # nobody else listens: no delivery through Redis at all

    other = await _connect("alice")
    shown = await send("c-2")
    assert await frames(other, 1) == [shown]
    assert len(delivered) == 1  # to the other socket's process channel only
    # Neither socket gets a second copy: a ping's answer is the next frame on both.
    for communicator in (tab, other):
        await communicator.send_json_to({"type": "ping"})
        assert await frames(communicator, 1) == [{"type": "pong"}]

    # A resend is acknowledged as a duplicate, and announced to nobody.
    await tab.send_json_to({"type": "message", "message": "Where is my order?", "client_message_id": "c-2"})
    assert (await frames(tab, 1))[0]["duplicate"] is True
    for communicator in (tab, other):
        await communicator.send_json_to({"type": "ping"})
        assert await frames(communicator, 1) == [{"type": "pong"}]
    assert len(delivered) == 1
    await tab.disconnect()
    await other.disconnect()
