"""Hand-off to humans: escalations, the silent bot, staff replies live and over REST, the admin queue."""

from __future__ import annotations

from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.core import signing
from django.test import AsyncClient
from django.urls import reverse

from agentflow import AgentFrameworkBuilder, IntentCategory, pipeline
from agentflow.agent import HANDOFF_NOTICE
from agentflow.errors import InvalidInput
from agentflow.testing.fake_anthropic import FakeReply
from agentflow_project.asgi import application
from conversations.chat_tokens import CHAT_TOKEN_SALT
from conversations.handoff import (
    BOT_BACK_TEXT,
    escalation_claim,
    escalation_open,
    escalation_release,
    escalation_resolve,
    staff_reply,
)
from conversations.models import Escalation, Message, Thread
from conversations.selectors import thread_held_by_human
from tests.conftest import ORIGIN

from .factories import MessageFactory, ThreadFactory
from .helpers import receive_until

ESCALATION = IntentCategory(
    "ESCALATION",
    "Urgent issues that need a human now",
    ["I want to speak to a manager", "This is urgent, data loss"],
    handoff=True,
)
ASK_MANAGER = "I want to speak to a manager now"
FOLLOW_UP = "Hello? I am still waiting for the manager"
REASON = "intent ESCALATION is always handed to a human"
TURN_TIMEOUT = 20


async def _agent(llm_client: Any = None) -> Any:
    # No thread judgement: the placement of a message must not call the LLM either in these tests.
    config = {"session_config": {"llm_thread_judgement": False}}
    return (
        await AgentFrameworkBuilder()
        .with_intent_categories([ESCALATION])
        .with_config(config)
        .build(llm_client)
    )


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_superuser(
        "ops", "ops@example.com", "ops-password-123", first_name="Dana"
    )


@pytest.fixture
def other_staff(django_user_model):
    return django_user_model.objects.create_user("sam", "sam@example.com", "sam-password-123", is_staff=True)


def _token(user_id: str) -> str:
    return signing.dumps({"u": user_id}, salt=CHAT_TOKEN_SALT, compress=True)


async def _connect(user_id: str) -> WebsocketCommunicator:
    communicator = WebsocketCommunicator(application, f"/ws/chat/?token={_token(user_id)}", headers=[ORIGIN])
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from())["type"] == "ready"
    return communicator


def _roles_and_contents(thread: Thread) -> list[tuple[str, str]]:
    return list(Message.objects.filter(thread=thread).order_by("created_at").values_list("role", "content"))


def _frame(kind: str, message: Message) -> dict[str, Any]:
    return {
        "type": kind,
        "id": str(message.pk),
        "thread_id": str(message.thread_id),
        "role": message.role,
        "content": message.content,
        "status": "done",
        "client_message_id": None,
        "reply_to": None,
        "intent": None,
        "thread_event": None,
        "escalated": False,
        "created_at": message.created_at.isoformat(),
    }


# --- the turn pipeline ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_an_escalating_turn_opens_one_escalation_and_the_bot_then_stays_silent(
    anthropic_client, fake_llm
) -> None:
    agent = await _agent(anthropic_client)

    first = await agent.process_message(user_id="alice", message=ASK_MANAGER)

    asked = await Message.objects.aget(pk=first["message_id"])
    thread = await Thread.objects.aget(pk=first["thread_id"])
    escalation = await Escalation.objects.aget()
    assert (first["content"], first["handled_by"], first["escalated"]) == (HANDOFF_NOTICE, "handoff", True)
    assert (escalation.thread_id, escalation.user_id, escalation.message_id) == (
        thread.pk,
        asked.user_id,
        asked.pk,
    )
    assert (escalation.status, escalation.holder_id, escalation.reason) == ("open", None, REASON)
    assert escalation.claimed_at is None and escalation.resolved_at is None
    assert await sync_to_async(thread_held_by_human)(thread=thread)

    second = await agent.process_message(user_id="alice", message=FOLLOW_UP)

    held = await Message.objects.aget(pk=second["message_id"])
    assert second["thread_id"] == str(thread.pk)
    assert (second["status"], second["content"], second["handled_by"], second["escalated"]) == (
        "done",
        None,
        "human",
        True,
    )
    assert "reply_id" not in second
    assert (held.status, held.handled_by, held.escalated) == ("done", "human", True)
    assert not await Message.objects.filter(reply_to=held).aexists()
    assert await sync_to_async(_roles_and_contents)(thread) == [
        ("user", ASK_MANAGER),
        ("assistant", HANDOFF_NOTICE),
        ("user", FOLLOW_UP),
    ]
    assert await Escalation.objects.acount() == 1
    assert fake_llm.requests == []  # neither the hand-off notice nor the silent turn asked the LLM


@pytest.mark.django_db(transaction=True)
async def test_finishing_an_escalating_turn_twice_opens_one_escalation() -> None:
    agent = await _agent()
    stored = (await sync_to_async(pipeline.accept)(agent, user_id="alice", message=ASK_MANAGER)).message
    prepared = await sync_to_async(pipeline.prepare)(agent, message_id=stored.pk)
    outcome = await agent.respond(prepared)

    first = await sync_to_async(pipeline.finish)(agent, prepared, outcome)
    again = await sync_to_async(pipeline.finish)(agent, prepared, outcome)

    assert first["escalated"] is True and again["status"] == "done"
    assert await Escalation.objects.acount() == 1
    assert await Message.objects.filter(role="assistant").acount() == 1

    # A turn in the now-held thread, finished twice, even after the thread was handed back between.
    stored = (await sync_to_async(pipeline.accept)(agent, user_id="alice", message=FOLLOW_UP)).message
    prepared = await sync_to_async(pipeline.prepare)(agent, message_id=stored.pk)
    outcome = await agent.respond(prepared)
    assert (prepared.held_by_human, outcome.text, outcome.handled_by) == (True, "", "human")
    held = await sync_to_async(pipeline.finish)(agent, prepared, outcome)
    await Escalation.objects.aupdate(status=Escalation.Status.RESOLVED)
    again = await sync_to_async(pipeline.finish)(agent, prepared, outcome)

    assert held == again
    assert (held["status"], held["content"], held["handled_by"]) == ("done", None, "human")
    assert await Escalation.objects.acount() == 1
    assert await Message.objects.filter(role="assistant").acount() == 1


@pytest.mark.django_db(transaction=True)
async def test_after_hand_back_the_bot_answers_again(anthropic_client, fake_llm, staff) -> None:
    agent = await _agent(anthropic_client)
    first = await agent.process_message(user_id="alice", message=ASK_MANAGER)
    escalation = await Escalation.objects.aget()
    await sync_to_async(escalation_claim)(escalation=escalation, staff_user=staff)
    await sync_to_async(escalation_resolve)(escalation=escalation, staff_user=staff)
    fake_llm.enqueue(FakeReply(text="Glad it is sorted."))

    after = await agent.process_message(user_id="alice", message="Thanks, that fixed it!")

    assert after["thread_id"] == first["thread_id"]
    assert (after["content"], after["handled_by"], after["escalated"]) == ("Glad it is sorted.", "llm", False)
    assert len(fake_llm.requests) == 1
    thread = await Thread.objects.aget(pk=first["thread_id"])
    assert not await sync_to_async(thread_held_by_human)(thread=thread)
    assert (await sync_to_async(_roles_and_contents)(thread))[2:] == [
        ("system", "A member of our team (Dana) has joined the conversation."),
        ("system", BOT_BACK_TEXT),
        ("user", "Thanks, that fixed it!"),
        ("assistant", "Glad it is sorted."),
    ]


# --- live events and REST ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_staff_messages_reach_the_user_live_and_over_rest_and_no_one_else(api_key, staff) -> None:
    agent = await _agent()
    first = await agent.process_message(user_id="alice", message=ASK_MANAGER)
    await agent.process_message(user_id="bob", message=ASK_MANAGER)
    escalation = await Escalation.objects.aget(user__external_id="alice")
    thread = await Thread.objects.aget(pk=first["thread_id"])
    alice, bob = await _connect("alice"), await _connect("bob")

    await sync_to_async(escalation_claim)(escalation=escalation, staff_user=staff)
    joined = await Message.objects.aget(thread=thread, role="system")
    assert await alice.receive_json_from(timeout=5) == _frame("human_joined", joined)
    assert joined.content == "A member of our team (Dana) has joined the conversation."

    reply = await sync_to_async(staff_reply)(thread=thread, staff_user=staff, content="  Hi, Dana here.  ")
    assert await alice.receive_json_from(timeout=5) == _frame("human_message", reply)
    assert (reply.role, reply.content, reply.thread_id, reply.status) == (
        "human_agent",
        "Hi, Dana here.",
        thread.pk,
        "done",
    )

    await sync_to_async(escalation_resolve)(escalation=escalation, staff_user=staff)
    back = await Message.objects.aget(thread=thread, role="system", content=BOT_BACK_TEXT)
    assert await alice.receive_json_from(timeout=5) == _frame("bot_back", back)
    assert await bob.receive_nothing(timeout=0.5)

    response = await AsyncClient().get(
        f"/api/users/alice/threads/{thread.pk}/messages", headers={"X-API-Key": api_key}
    )
    assert response.status_code == 200
    assert [(m["role"], m["content"]) for m in response.json()] == [
        ("user", ASK_MANAGER),
        ("assistant", "[Offline mode] " + HANDOFF_NOTICE),
        ("system", "A member of our team (Dana) has joined the conversation."),
        ("human_agent", "Hi, Dana here."),
        ("system", BOT_BACK_TEXT),
    ]
    await alice.disconnect()
    await bob.disconnect()


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
async def test_rest_and_websocket_turns_in_a_held_thread_have_no_reply(celery_worker, api_key) -> None:
    await _agent()  # syncs the ESCALATION category, which the workers' default agent then uses
    client = AsyncClient()

    async def post(text: str) -> Any:
        return await client.post(
            "/api/users/alice/messages",
            {"message": text},
            content_type="application/json",
            headers={"X-API-Key": api_key},
        )

    first = (await post(ASK_MANAGER)).json()
    response = await post(FOLLOW_UP)

    body = response.json()
    assert response.status_code == 200, body
    assert (body["status"], body["content"], body["handled_by"], body["escalated"]) == (
        "done",
        None,
        "human",
        True,
    )
    assert (body["thread_id"], body["reply_id"]) == (first["thread_id"], None)

    alice = await _connect("alice")
    await alice.send_json_to({"type": "message", "message": "Anyone? I need the manager please"})
    ack = await alice.receive_json_from()
    turn, _ = await receive_until(alice, "turn", timeout=TURN_TIMEOUT)
    assert (turn["type"], turn["message_id"], turn["content"], turn["handled_by"]) == (
        "turn",
        ack["message_id"],
        None,
        "human",
    )
    assert await Message.objects.filter(role="assistant").acount() == 1
    assert await Escalation.objects.acount() == 1
    await alice.disconnect()


# --- services: refusals change nothing -----------------------------------------------------------


def _open_escalation() -> Escalation:
    asked = MessageFactory(content=ASK_MANAGER)
    return escalation_open(thread=asked.thread, message=asked, reason=REASON)


def _state() -> dict[str, Any]:
    return {
        "escalations": list(Escalation.objects.order_by("pk").values_list("pk", "status", "holder_id")),
        "messages": list(Message.objects.order_by("pk").values_list("pk", "role", "content")),
    }


@pytest.mark.django_db
def test_escalation_open_is_idempotent_per_thread() -> None:
    escalation = _open_escalation()

    again = escalation_open(thread=escalation.thread, message=None, reason="something else")

    assert again.pk == escalation.pk
    assert Escalation.objects.count() == 1


@pytest.mark.django_db
def test_staff_reply_by_a_non_holder_or_empty_or_unclaimed_is_refused_and_stores_nothing(
    staff, other_staff
) -> None:
    escalation = _open_escalation()
    thread = escalation.thread
    before = _state()
    with pytest.raises(PermissionError, match="claim this escalation before replying"):
        staff_reply(thread=thread, staff_user=staff, content="Hello")
    escalation_claim(escalation=escalation, staff_user=staff)
    before = _state()

    with pytest.raises(PermissionError, match="this thread is held by Dana; only they can reply"):
        staff_reply(thread=thread, staff_user=other_staff, content="Hello")
    with pytest.raises(InvalidInput, match="message must not be empty"):
        staff_reply(thread=thread, staff_user=staff, content=" \n ")
    with pytest.raises(PermissionError, match="no human holds this thread"):
        staff_reply(thread=ThreadFactory(), staff_user=staff, content="Hello")

    assert _state() == before


@pytest.mark.django_db
def test_state_changes_in_the_wrong_state_are_refused_and_change_nothing(staff, other_staff) -> None:
    escalation = _open_escalation()
    with pytest.raises(InvalidInput, match="only a claimed escalation can be released; this one is open"):
        escalation_release(escalation=escalation, staff_user=staff)
    escalation_claim(escalation=escalation, staff_user=staff)
    before = _state()

    with pytest.raises(InvalidInput, match="already claimed by Dana"):
        escalation_claim(escalation=escalation, staff_user=other_staff)
    with pytest.raises(PermissionError, match="held by Dana; only they can release it"):
        escalation_release(escalation=escalation, staff_user=other_staff)
    with pytest.raises(PermissionError, match="held by Dana; only they can hand it back"):
        escalation_resolve(escalation=escalation, staff_user=other_staff)
    assert _state() == before

    escalation_release(escalation=escalation, staff_user=staff)
    escalation.refresh_from_db()
    assert (escalation.status, escalation.holder_id, escalation.claimed_at) == ("open", None, None)
    escalation_resolve(escalation=escalation, staff_user=other_staff)
    escalation.refresh_from_db()
    assert (escalation.status, escalation.holder_id) == ("resolved", other_staff.pk)
    before = _state()
    with pytest.raises(InvalidInput, match="already handed back"):
        escalation_resolve(escalation=escalation, staff_user=staff)
    with pytest.raises(InvalidInput, match="is resolved"):
        escalation_claim(escalation=escalation, staff_user=staff)
    assert _state() == before
    assert escalation_open(thread=escalation.thread, message=None, reason="again").pk != escalation.pk


# --- the admin queue -----------------------------------------------------------------------------


@pytest.fixture
def staff_client(client, staff):
    client.force_login(staff)
    return client


def _action(client: Any, action: str, *escalations: Escalation) -> Any:
    return client.post(
        reverse("admin:conversations_escalation_changelist"),
        {"action": action, "_selected_action": [e.pk for e in escalations]},
        follow=True,
    )


def _notices(response: Any) -> list[str]:
    return [str(m) for m in response.context["messages"]]


@pytest.mark.django_db
def test_the_queue_lists_and_filters_escalations(staff_client) -> None:
    escalation = _open_escalation()

    page = staff_client.get(reverse("admin:conversations_escalation_changelist"), {"status__exact": "open"})
    claimed = staff_client.get(
        reverse("admin:conversations_escalation_changelist"), {"status__exact": "claimed"}
    )

    assert page.status_code == 200
    assert list(page.context["cl"].result_list) == [escalation]
    assert reverse("admin:conversations_thread_change", args=[escalation.thread_id]) in page.content.decode()
    assert list(claimed.context["cl"].result_list) == []


@pytest.mark.django_db
def test_queue_actions_claim_release_and_hand_back(staff_client, staff, other_staff) -> None:
    escalation = _open_escalation()

    assert _notices(_action(staff_client, "claim", escalation)) == ["Claimed 1 escalation(s)."]
    escalation.refresh_from_db()
    assert (escalation.status, escalation.holder_id) == ("claimed", staff.pk)

    before = _state()
    refused = _action(staff_client, "claim", escalation)
    assert _notices(refused) == [f"Escalation {escalation.pk}: this escalation is already claimed by Dana."]
    assert _state() == before

    assert _notices(_action(staff_client, "release", escalation)) == ["Released 1 escalation(s)."]
    assert _notices(_action(staff_client, "hand_back", escalation)) == ["Handed back 1 escalation(s)."]
    escalation.refresh_from_db()
    assert escalation.status == "resolved"
    before = _state()
    refused = _action(staff_client, "release", escalation)
    assert _notices(refused) == [
        f"Escalation {escalation.pk}: only a claimed escalation can be released; this one is resolved."
    ]
    assert _state() == before


@pytest.mark.django_db
def test_the_reply_form_sends_a_reply_and_shows_errors_storing_nothing(staff_client, staff) -> None:
    escalation = _open_escalation()
    escalation_claim(escalation=escalation, staff_user=staff)
    reply_url = reverse("admin:conversations_escalation_reply", args=[escalation.pk])
    change = staff_client.get(reverse("admin:conversations_escalation_change", args=[escalation.pk]))
    assert change.status_code == 200
    html = change.content.decode()
    assert reply_url in html and ASK_MANAGER in html
    # Not nested in the change form (browsers drop nested forms: "Send reply" would save instead).
    change_form = html.index('id="escalation_form"')
    assert html.index(f'action="{reply_url}"') > html.index("</form>", change_form)
    before = _state()

    empty = staff_client.post(reply_url, {"content": "   "})

    assert empty.status_code == 200
    assert empty.context["reply_form"].errors == {"content": ["message must not be empty"]}
    assert "message must not be empty" in empty.content.decode()
    assert _state() == before

    sent = staff_client.post(reply_url, {"content": "Dana here, looking into it."})

    assert sent.status_code == 302
    assert sent.url == reverse("admin:conversations_escalation_change", args=[escalation.pk])
    assert _roles_and_contents(escalation.thread)[-1] == ("human_agent", "Dana here, looking into it.")
