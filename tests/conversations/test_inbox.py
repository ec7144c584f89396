"""The hand-off inbox: its rows (open, mine, waiting; reasons; SLA), its one-click actions, the reply
box, the escalation page's buttons, the thread page's read-only state and the live staff queue socket."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import Permission
from django.test import Client
from django.urls import reverse
from django.utils import timezone

from agentflow_project.asgi import application
from conversations.console.queue import inbox_rows, sla_state
from conversations.handoff import escalation_claim, escalation_open, escalation_resolve
from conversations.models import CannedReply, Escalation, Message, Thread
from tests.conftest import ORIGIN

from .factories import EndUserFactory, MessageFactory, ThreadFactory
from .test_live_staff import _session_headers

pytestmark = pytest.mark.django_db

INBOX = "admin:conversations_escalation_inbox"


@pytest.fixture
def staff(django_user_model: Any) -> Any:
    return django_user_model.objects.create_superuser(
        "ops", "ops@example.com", "ops-password-123", first_name="Dana"
    )


@pytest.fixture
def sam(django_user_model: Any) -> Any:
    """Staff who may watch and act, not a superuser."""
    user = django_user_model.objects.create_user("sam", "sam@example.com", "sam-password-123", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            codename__in=["view_enduser", "view_escalation", "change_escalation"],
            content_type__app_label="conversations",
        )
    )
    return user


@pytest.fixture
def watcher(django_user_model: Any) -> Any:
    """Staff who may look at escalations but not act on them."""
    user = django_user_model.objects.create_user("val", "val@example.com", "val-password-123", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(
            codename__in=["view_enduser", "view_escalation"], content_type__app_label="conversations"
        )
    )
    return user


def _client(user: Any, **kwargs: Any) -> Client:
    client = Client(**kwargs)
    client.force_login(user)
    return client


def _escalation(external_id: str, text: str, *, intent: str = "", confidence: float | None = None, **kw: Any):
    thread = ThreadFactory(session__user__external_id=external_id, topic=text)
    asked = MessageFactory(thread=thread, content=text, intent=intent, confidence=confidence)
    return escalation_open(thread=thread, message=asked, reason=kw.get("reason", "offline mode"))


def _action(client: Client, escalation: Escalation, action: str, **data: str):
    url = reverse("admin:conversations_escalation_inbox_action", args=[escalation.pk, action])
    return client.post(url, data, follow=True)


def _shown(response: Any) -> list[tuple[str, str]]:
    return [(m.level_tag, str(m)) for m in response.context["messages"]]


def _state(escalation: Escalation) -> tuple[str, Any]:
    escalation.refresh_from_db()
    return escalation.status, escalation.holder_id


# --- rows ---------------------------------------------------------------------------------------


def test_rows_are_open_mine_and_waiting_with_a_specific_reason(staff: Any, sam: Any) -> None:
    opened = _escalation("alice", "Critical: production down", intent="ESCALATION", confidence=0.93)
    mine = _escalation("bob", "refund please")
    waiting = _escalation("carol", "where is my order")
    answered = _escalation("dave", "cancel my plan")
    resolved = _escalation("erin", "thanks")
    escalation_claim(escalation=mine, staff_user=staff)
    escalation_claim(escalation=waiting, staff_user=sam)
    MessageFactory(thread=waiting.thread, content="hello? anyone?")  # the user wrote last: waiting
    escalation_claim(escalation=answered, staff_user=sam)  # sam's join notice is the last message
    escalation_resolve(escalation=resolved, staff_user=staff)

    rows = {row["id"]: row for row in inbox_rows(staff_user=staff)}

    assert list(rows) == [opened.pk, mine.pk, waiting.pk]
    assert rows[opened.pk]["reason"] == "offline mode (intent ESCALATION at 0.93)"
    assert rows[opened.pk]["trigger"] == "Critical: production down"
    assert (rows[mine.pk]["mine"], rows[mine.pk]["waiting"], rows[mine.pk]["sla"]) == (True, False, "held")
    assert (rows[waiting.pk]["holder"], rows[waiting.pk]["waiting"]) == ("sam", True)
    assert rows[mine.pk]["since"] == Escalation.objects.get(pk=mine.pk).claimed_at
    assert [r["id"] for r in inbox_rows(staff_user=staff, show="open")] == [opened.pk]
    assert [r["id"] for r in inbox_rows(staff_user=staff, show="mine")] == [mine.pk]
    assert [r["id"] for r in inbox_rows(staff_user=staff, show="waiting")] == [waiting.pk]
    assert [r["id"] for r in inbox_rows(staff_user=sam, show="mine")] == [waiting.pk, answered.pk]


@pytest.mark.parametrize(
    ("minutes", "setting", "expected"),
    [
        (1, None, "ok"),
        (6, None, "warn"),
        (16, None, "breach"),
        (3, (2, 4), "warn"),
        (5, (2, 4), "breach"),
        (6, ("x", 4), "warn"),  # a bad setting falls back to the default (5, 15)
        (6, (10, 4), "warn"),
        (6, None, "warn"),
    ],
)
def test_sla_colours_follow_the_thresholds(settings: Any, minutes: int, setting: Any, expected: str) -> None:
    if setting is not None:
        settings.AGENTFLOW_INBOX_SLA_MINUTES = setting
    assert sla_state(waited_seconds=minutes * 60) == expected


def test_an_open_row_gets_its_sla_colour_from_its_age(staff: Any) -> None:
    old = _escalation("alice", "help")
    Escalation.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(minutes=20))
    assert inbox_rows(staff_user=staff)[0]["sla"] == "breach"


# --- the page -------------------------------------------------------------------------------------


def test_the_page_shows_the_conversation_threads_memories_and_canned_replies(staff: Any) -> None:
    escalation = _escalation("alice", "Critical: production down", intent="ESCALATION", confidence=0.93)
    ThreadFactory(session__user=escalation.user, topic="an older invoice question")
    CannedReply.objects.create(title="Looking", body="I am looking into it now.")
    CannedReply.objects.create(title="Other agent", body="x", agent=EndUserFactory(agent__name="other").agent)
    response = _client(staff).get(reverse(INBOX), {"e": escalation.pk})

    assert response.status_code == 200
    detail = response.context["detail"]
    assert [m.content for m in detail["messages"]] == ["Critical: production down"]
    assert [t.topic for t in detail["other_threads"]] == ["an older invoice question"]
    assert [c.title for c in detail["canned"]] == ["Looking"]
    assert detail["can_reply"] is False
    assert [a[0] for a in detail["actions"] if a[2]] == ["claim", "hand_back", "resolve"]
    page = response.content.decode()
    assert "ESCALATION 0.93" in page and "asked for a human" in page
    assert response.context["inbox_config"]["userPath"] == f"/ws/staff/users/{escalation.user_id}/"


@pytest.mark.parametrize("selected", ["abc", "-1", "99999999999999999999", "0", ""])
def test_a_bad_selection_shows_the_list_without_a_conversation(staff: Any, selected: str) -> None:
    _escalation("alice", "help")
    response = _client(staff).get(reverse(INBOX), {"e": selected, "show": "<script>"})
    assert response.status_code == 200
    assert (response.context["detail"], response.context["show"]) == (None, "all")


def test_the_inbox_needs_an_admin_login_and_the_view_permission(
    client: Client, django_user_model: Any
) -> None:
    assert client.get(reverse(INBOX)).status_code == 302  # to the admin login
    plain = django_user_model.objects.create_user("pat", password="pat-password-123", is_staff=True)
    assert _client(plain).get(reverse(INBOX)).status_code == 403


# --- actions --------------------------------------------------------------------------------------


def test_claim_release_hand_back_and_resolve_from_the_inbox(staff: Any) -> None:
    escalation = _escalation("alice", "help")
    client = _client(staff)

    claimed = _action(client, escalation, "claim", show="mine")
    assert _shown(claimed) == [("success", f"Claimed: escalation {escalation.pk}.")]
    assert claimed.redirect_chain[-1][0] == f"{reverse(INBOX)}?show=mine&e={escalation.pk}"
    assert _state(escalation) == ("claimed", staff.pk)
    again = _action(client, escalation, "claim")
    assert _shown(again) == [
        ("error", f"Escalation {escalation.pk}: this escalation is already claimed by Dana.")
    ]

    assert _shown(_action(client, escalation, "release"))[0][0] == "success"
    assert _state(escalation) == ("open", None)
    assert _shown(_action(client, escalation, "hand_back"))[0][0] == "success"
    assert _state(escalation) == ("resolved", staff.pk)

    other = _escalation("bob", "refund")
    assert _shown(_action(client, other, "resolve")) == [
        ("success", f"Handed back and resolved: escalation {other.pk}.")
    ]
    other.thread.refresh_from_db()
    assert (_state(other), other.thread.status) == (("resolved", staff.pk), Thread.Status.RESOLVED)


def test_another_staff_members_claim_cannot_be_released_by_sam(staff: Any, sam: Any) -> None:
    escalation = _escalation("alice", "help")
    escalation_claim(escalation=escalation, staff_user=staff)

    response = _action(_client(sam), escalation, "release")

    assert _shown(response) == [
        ("error", f"Escalation {escalation.pk}: this escalation is held by Dana; only they can release it.")
    ]
    assert _state(escalation) == ("claimed", staff.pk)


def test_actions_need_post_csrf_the_change_permission_and_a_known_action(staff: Any, watcher: Any) -> None:
    escalation = _escalation("alice", "help")
    url = reverse("admin:conversations_escalation_inbox_action", args=[escalation.pk, "claim"])

    assert _client(staff).get(url).status_code == 405
    assert _client(staff, enforce_csrf_checks=True).post(url).status_code == 403
    assert _client(watcher).post(url).status_code == 403
    bad = reverse("admin:conversations_escalation_inbox_action", args=[escalation.pk, "delete"])
    assert _client(staff).post(bad).status_code == 404
    for wrong in ("abc", "999999"):
        missing = reverse("admin:conversations_escalation_inbox_action", args=[wrong, "claim"])
        assert _client(staff).post(missing).status_code == 404
    assert _state(escalation) == ("open", None)


def test_the_reply_box_without_javascript(staff: Any, sam: Any) -> None:
    escalation = _escalation("alice", "help")
    url = reverse("admin:conversations_escalation_inbox_reply", args=[escalation.pk])

    refused = _client(staff).post(url, {"content": "Hi"}, follow=True)
    assert _shown(refused) == [("error", "Reply not sent: claim this escalation before replying.")]
    escalation_claim(escalation=escalation, staff_user=staff)
    assert _shown(_client(staff).post(url, {"content": ""}, follow=True)) == [
        ("error", "Write a reply of at most 4000 characters.")
    ]
    assert _shown(_client(staff).post(url, {"content": "x" * 4001}, follow=True))[0][0] == "error"
    assert _shown(_client(sam).post(url, {"content": "Hi"}, follow=True)) == [
        ("error", "Reply not sent: this thread is held by Dana; only they can reply.")
    ]
    assert not Message.objects.filter(role=Message.Role.HUMAN_AGENT).exists()

    sent = _client(staff).post(url, {"content": "Hi, Dana here."}, follow=True)

    assert _shown(sent) == [("success", "Reply sent.")]
    assert list(Message.objects.filter(role="human_agent").values_list("content", flat=True)) == [
        "Hi, Dana here."
    ]


# --- the escalation and thread pages ------------------------------------------------------------


def test_the_escalation_page_has_a_claim_button_that_comes_back_to_it(staff: Any) -> None:
    escalation = _escalation("alice", "Critical: production down", intent="ESCALATION", confidence=0.93)
    client = _client(staff)
    page = client.get(reverse("admin:conversations_escalation_change", args=[escalation.pk]))
    content = page.content.decode()
    claim = reverse("admin:conversations_escalation_inbox_action", args=[escalation.pk, "claim"])
    assert f'action="{claim}"' in content
    assert "Critical: production down" in content and "intent ESCALATION at 0.93" in content

    response = client.post(claim, {"next": "change"}, follow=True)

    assert response.redirect_chain[-1][0] == reverse(
        "admin:conversations_escalation_change", args=[escalation.pk]
    )
    assert _state(escalation) == ("claimed", staff.pk)
    assert "Hand back to the bot" in response.content.decode()


def test_the_thread_page_is_read_only_and_shows_no_raw_vectors(staff: Any) -> None:
    thread = ThreadFactory(topic="login broken", vocabulary=["login", "broken"], topic_weight=2)
    page = _client(staff).get(reverse("admin:conversations_thread_change", args=[thread.pk]))
    assert page.status_code == 200
    form = page.context["adminform"].form
    assert list(form.fields) == []  # nothing editable
    content = page.content.decode()
    assert "Words seen (2): login, broken" in content
    assert "Topic folded from 2 user message(s)" in content
    assert "topic_embedding" not in content and "vocabulary" not in content


# --- the live queue socket ------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
async def test_the_queue_socket_announces_new_and_changed_escalations(staff: Any) -> None:
    headers = await sync_to_async(_session_headers)(staff)
    communicator = WebsocketCommunicator(application, "/ws/staff/queue/", headers=headers)
    connected, _ = await communicator.connect()
    assert connected
    assert await communicator.receive_json_from() == {"type": "ready", "protocol": 1}

    escalation = await sync_to_async(_escalation)("alice", "Critical: production down", intent="ESCALATION")
    opened = await communicator.receive_json_from(timeout=5)
    assert (opened["type"], opened["escalation_id"]) == ("escalation_opened", escalation.pk)
    assert {k: opened["escalation"][k] for k in ("user", "status", "trigger", "reason", "sla")} == {
        "user": "alice",
        "status": "open",
        "trigger": "Critical: production down",
        "reason": "offline mode (intent ESCALATION)",
        "sla": "ok",
    }
    await sync_to_async(escalation_claim)(escalation=escalation, staff_user=staff)
    changed = await communicator.receive_json_from(timeout=5)
    assert (changed["type"], changed["status"], changed["escalation"]["mine"]) == (
        "escalation_changed",
        "claimed",
        True,
    )
    await sync_to_async(escalation_resolve)(escalation=escalation, staff_user=staff)
    resolved = await communicator.receive_json_from(timeout=5)
    assert (resolved["type"], resolved["status"], resolved["escalation"]) == (
        "escalation_changed",
        "resolved",
        None,
    )
    await communicator.disconnect()


@pytest.mark.django_db(transaction=True)
async def test_the_queue_socket_refuses_anyone_but_staff(django_user_model: Any) -> None:
    plain = await sync_to_async(django_user_model.objects.create_user)("pat", password="pat-password-123")
    for headers in ([ORIGIN], await sync_to_async(_session_headers)(plain)):
        communicator = WebsocketCommunicator(application, "/ws/staff/queue/", headers=headers)
        connected, _ = await communicator.connect()
        assert connected  # accepted, told why, closed
        assert (await communicator.receive_json_from())["code"] == "forbidden"
        assert (await communicator.receive_output())["code"] == 4403
        await communicator.disconnect()
