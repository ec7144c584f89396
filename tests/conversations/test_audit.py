"""The audit trail: who did what, for staff actions, API-key calls, export, erase and logins."""

from __future__ import annotations

import json
from io import StringIO
from typing import Any

import pytest
from django.contrib.admin.models import CHANGE, DELETION, LogEntry
from django.core.management import call_command
from django.test import Client
from django.urls import reverse

from agentflow.embeddings import get_embedder
from conversations.audit import audit_record, subject_hash
from conversations.handoff import escalation_claim, escalation_open, escalation_release, staff_reply
from conversations.models import ApiKey, AuditEvent, EndUser, Escalation, Message
from intents.models import IntentCategory
from memory.models import Memory
from memory.services import memory_add
from tests.conversations.factories import default_agent_row

from .factories import MessageFactory, ThreadFactory

pytestmark = pytest.mark.django_db

Action = AuditEvent.Action


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_superuser("ops", "ops@example.com", "ops-password-123")


@pytest.fixture
def other_staff(django_user_model):
    return django_user_model.objects.create_user("sam", "sam@example.com", "sam-password-123", is_staff=True)


@pytest.fixture
def staff_client(client, staff):
    client.force_login(staff)
    return client


def _rows(*, logins: bool = False, **filters: Any) -> list[tuple[Any, ...]]:
    """The audit rows in order; the staff_client's own login (force_login) is left out unless asked."""
    rows = AuditEvent.objects.filter(**filters)
    if not logins:
        rows = rows.exclude(action=Action.LOGIN)
    return list(
        rows.order_by("created_at", "id").values_list(
            "action", "actor_kind", "staff_username", "api_key_label", "target_type", "subject"
        )
    )


def _action(client: Client, model: str, action: str, objects: list[Any]):
    return client.post(
        reverse(f"admin:{model.replace('.', '_')}_changelist"),
        {"action": action, "_selected_action": [str(o.pk) for o in objects]},
    )


def _escalation(external_id: str = "alice") -> Escalation:
    message = MessageFactory(thread__session__user__external_id=external_id)
    return escalation_open(thread=message.thread, message=message, reason="needs a human")


# --- staff actions -----------------------------------------------------------------------------


def test_claim_reply_release_and_hand_back_are_audited_with_the_staff_account(staff_client, staff) -> None:
    escalation = _escalation()
    escalation_claim(escalation=escalation, staff_user=staff)
    reply = staff_reply(thread=escalation.thread, staff_user=staff, content="Hello, I am here to help")
    escalation_release(escalation=escalation, staff_user=staff)
    _action(staff_client, "conversations.escalation", "hand_back", [escalation])

    assert _rows() == [
        (Action.ESCALATION_CLAIM, "staff", "ops", "", "escalation", "alice"),
        (Action.STAFF_REPLY, "staff", "ops", "", "message", "alice"),
        (Action.ESCALATION_RELEASE, "staff", "ops", "", "escalation", "alice"),
        (Action.ESCALATION_HAND_BACK, "staff", "ops", "", "escalation", "alice"),
    ]
    reply_row = AuditEvent.objects.get(action=Action.STAFF_REPLY)
    assert reply_row.staff_user == staff
    assert reply_row.target_id == str(reply.pk)
    assert reply_row.detail == {
        "thread_id": str(escalation.thread_id),
        "escalation_id": escalation.pk,
        "chars": len("Hello, I am here to help"),
    }
    hand_back = AuditEvent.objects.get(action=Action.ESCALATION_HAND_BACK)
    assert hand_back.ip == "127.0.0.1"  # from the admin request (audit_scope)
    assert hand_back.route == "POST /admin/conversations/escalation/"
    # Django's own admin log has the admin action as well.
    assert list(LogEntry.objects.values_list("object_id", "action_flag", "change_message")) == [
        (str(escalation.pk), CHANGE, "Handed back.")
    ]


def test_a_refused_staff_action_records_nothing(staff, other_staff) -> None:
    escalation = _escalation()
    escalation_claim(escalation=escalation, staff_user=staff)
    before = _rows()

    with pytest.raises(PermissionError):
        staff_reply(thread=escalation.thread, staff_user=other_staff, content="not mine")
    with pytest.raises(PermissionError):
        escalation_release(escalation=escalation, staff_user=other_staff)

    assert _rows() == before
    assert Message.objects.filter(role=Message.Role.HUMAN_AGENT).count() == 0


def test_thread_admin_actions_are_audited_and_in_the_admin_log(staff_client) -> None:
    first = MessageFactory(thread__session__user__external_id="bob")
    thread = first.thread
    second = MessageFactory(thread=thread)
    other = ThreadFactory(session=thread.session)

    _action(staff_client, "conversations.thread", "resolve_threads", [thread])
    _action(staff_client, "conversations.thread", "reopen_threads", [thread])
    _action(staff_client, "conversations.message", "split_thread", [second])
    _action(staff_client, "conversations.thread", "merge_threads", [thread, other])

    assert [row[:2] + row[4:] for row in _rows()] == [
        (Action.THREAD_RESOLVE, "staff", "thread", "bob"),
        (Action.THREAD_REOPEN, "staff", "thread", "bob"),
        (Action.THREAD_SPLIT, "staff", "thread", "bob"),
        (Action.THREAD_MERGE, "staff", "thread", "bob"),
    ]
    assert LogEntry.objects.filter(action_flag=CHANGE).count() == 5  # resolve, reopen, split, merge x2
    assert set(LogEntry.objects.values_list("user__username", flat=True)) == {"ops"}


def test_memory_approve_and_withdraw_are_audited_per_memory(staff_client) -> None:
    memory = memory_add(
        user=None,
        agent_id=default_agent_row().pk,
        kind="fact",
        content="Refunds take 5 days",
        embedder=get_embedder(),
    )
    Memory.objects.filter(pk=memory.pk).update(approved=False)

    _action(staff_client, "memory.memory", "approve", [memory])
    _action(staff_client, "memory.memory", "approve", [memory])  # already approved: nothing to record
    _action(staff_client, "memory.memory", "withdraw", [memory])

    assert [row[:3] + row[4:5] for row in _rows()] == [
        (Action.MEMORY_APPROVE, "staff", "ops", "memory"),
        (Action.MEMORY_WITHDRAW, "staff", "ops", "memory"),
    ]
    assert list(LogEntry.objects.order_by("id").values_list("change_message", flat=True)) == [
        "Approved.",
        "Withdrawn from use.",
    ]


def test_category_threshold_edit_is_audited_with_old_and_new_values(staff_client) -> None:
    category = IntentCategory.objects.create(
        agent=default_agent_row(),
        name="BILLING",
        description="Billing questions",
        examples=["my invoice"],
        threshold=0.5,
    )
    url = reverse("admin:intents_intentcategory_change", args=[category.pk])
    form = {
        "agent": str(category.agent_id),
        "name": "BILLING",
        "description": "Billing questions",
        "examples": "my invoice",
        "threshold": "0.8",
        "on_low_confidence": "handoff",
        "system_prompt": "",
        "active": "on",
    }

    response = staff_client.post(url, form)

    assert response.status_code == 302
    event = AuditEvent.objects.exclude(action=Action.LOGIN).get()
    assert (event.action, event.staff_username, event.target_type, event.target_id) == (
        Action.CATEGORY_CHANGE,
        "ops",
        "intentcategory",
        str(category.pk),
    )
    assert event.detail == {
        "name": "BILLING",
        "changed": ["threshold"],
        "threshold": {"from": 0.5, "to": 0.8},
    }


# --- API keys, export and erase ------------------------------------------------------------------


def test_an_api_key_call_records_the_key_route_and_user(api_key: str) -> None:
    response = Client().post("/api/users/carol/chat-token", headers={"X-API-Key": api_key})

    assert response.status_code == 200
    key = ApiKey.objects.get(prefix=api_key[:12])
    event = AuditEvent.objects.get()
    assert (event.action, event.actor_kind, event.api_key, event.subject, event.ip) == (
        Action.API_CALL,
        "api_key",
        key,
        "carol",
        "127.0.0.1",
    )
    assert event.route == "POST /api/users/<user_id>/chat-token"
    assert event.api_key_label == f"{key.name} ({key.prefix})"


@pytest.mark.parametrize(
    ("header", "reason"),
    [("afk_not-a-real-key", "unknown key"), ("garbage", "unknown key")],
)
def test_a_wrong_api_key_is_refused_and_recorded(api_key: str, header: str, reason: str) -> None:
    response = Client().post("/api/users/carol/chat-token", headers={"X-API-Key": header})

    assert response.status_code == 401
    event = AuditEvent.objects.get()
    assert (event.action, event.actor_kind, event.api_key, event.ip, event.detail) == (
        Action.API_AUTH_FAILED,
        "anonymous",
        None,
        "127.0.0.1",
        {"reason": reason},
    )
    assert EndUser.objects.count() == 0


def test_a_deactivated_key_is_recorded_as_that_key(api_key: str) -> None:
    key = ApiKey.objects.get(prefix=api_key[:12])
    ApiKey.objects.filter(pk=key.pk).update(active=False)

    response = Client().get("/api/users/carol/threads", headers={"X-API-Key": api_key})

    assert response.status_code == 401
    event = AuditEvent.objects.get()
    assert (event.action, event.api_key, event.detail) == (
        Action.API_AUTH_FAILED,
        key,
        {"reason": "inactive key"},
    )


def test_export_is_audited_and_includes_the_users_audit_entries(api_key: str, staff) -> None:
    escalation = _escalation("dana")
    escalation_claim(escalation=escalation, staff_user=staff)
    _escalation("erin")  # another user's trail is not in dana's export
    escalation_claim(escalation=Escalation.objects.get(user__external_id="erin"), staff_user=staff)

    response = Client().get("/api/users/dana/export", headers={"X-API-Key": api_key})

    assert response.status_code == 200
    audit = response.json()["audit"]
    key = ApiKey.objects.get(prefix=api_key[:12])
    for row in audit:
        row.pop("created_at")
    assert audit == [
        {
            "action": "escalation_claim",
            "actor": "staff",
            "by": "ops",
            "target_type": "escalation",
            "target_id": str(escalation.pk),
        },
        {
            "action": "api_call",
            "actor": "api_key",
            "by": f"{key.name} ({key.prefix})",
            "target_type": None,
            "target_id": None,
        },
        {
            "action": "user_export",
            "actor": "api_key",
            "by": f"{key.name} ({key.prefix})",
            "target_type": "enduser",
            "target_id": str(escalation.user_id),
        },
    ]


def test_erase_keeps_the_audit_rows_without_the_users_personal_data(api_key: str, staff) -> None:
    escalation = _escalation("frank")
    escalation_claim(escalation=escalation, staff_user=staff)
    staff_reply(thread=escalation.thread, staff_user=staff, content="Hi Frank")
    before = AuditEvent.objects.count()

    response = Client().delete("/api/users/frank", headers={"X-API-Key": api_key})

    assert response.status_code == 200
    assert AuditEvent.objects.count() == before + 2  # the API call and the erase; nothing deleted
    assert AuditEvent.objects.filter(subject="frank").count() == 0
    assert not AuditEvent.objects.filter(detail__icontains="frank").exists()
    erase = AuditEvent.objects.get(action=Action.USER_ERASE)
    key = ApiKey.objects.get(prefix=api_key[:12])
    assert (erase.actor_kind, erase.api_key, erase.subject, erase.subject_hash) == (
        "api_key",
        key,
        "",
        subject_hash("frank"),
    )
    assert erase.detail == response.json()["erased"]
    reply = AuditEvent.objects.get(action=Action.STAFF_REPLY)
    assert (reply.staff_username, reply.target_id, reply.detail) == ("ops", "", {})


def test_erase_from_the_admin_is_audited_and_in_the_admin_log(staff_client) -> None:
    user = EndUser.objects.create(agent=default_agent_row(), external_id="gina")

    confirmation = _action(staff_client, "conversations.enduser", "erase_users", [user])
    assert confirmation.status_code == 200 and _rows() == []  # asking erases nothing
    response = staff_client.post(
        reverse("admin:conversations_enduser_changelist"),
        {"action": "erase_users", "_selected_action": [str(user.pk)], "confirm": "yes"},
    )

    assert response.status_code == 302
    assert EndUser.objects.count() == 0
    assert _rows(action=Action.USER_ERASE) == [(Action.USER_ERASE, "staff", "ops", "", "enduser", "")]
    assert list(LogEntry.objects.values_list("object_repr", "action_flag")) == [("gina", DELETION)]


# --- logins -----------------------------------------------------------------------------------------


def test_admin_logins_and_failures_are_audited(staff) -> None:
    client = Client()
    login = reverse("admin:login")

    client.post(login, {"username": "ops", "password": "wrong-password"})
    client.post(login, {"username": "ops", "password": "ops-password-123"})

    assert _rows(logins=True) == [
        (Action.LOGIN_FAILED, "anonymous", "", "", "", ""),
        (Action.LOGIN, "staff", "ops", "", "", ""),
    ]
    failed = AuditEvent.objects.get(action=Action.LOGIN_FAILED)
    assert (failed.detail, failed.ip) == ({"username": "ops"}, "127.0.0.1")
    assert "wrong-password" not in json.dumps(list(AuditEvent.objects.values("detail")))


def test_admin_login_is_locked_out_after_repeated_failures(staff, settings) -> None:
    settings.AXES_FAILURE_LIMIT = 3
    client = Client()
    login = reverse("admin:login")

    statuses = [
        client.post(login, {"username": "ops", "password": f"guess-{i}"}).status_code for i in range(3)
    ]
    locked = client.post(login, {"username": "ops", "password": "ops-password-123"})

    assert statuses == [200, 200, 429]  # the third failure locks the username out from this address
    assert locked.status_code == 429  # even the right password: locked out
    assert "_auth_user_id" not in client.session
    assert AuditEvent.objects.filter(action=Action.LOGIN).count() == 0


# --- append-only, and the admin page --------------------------------------------------------------


def test_audit_rows_cannot_be_changed_or_deleted_through_the_orm(staff) -> None:
    event = audit_record(action=Action.LOGIN, staff_user=staff)

    with pytest.raises(PermissionError):
        AuditEvent.objects.filter(pk=event.pk).update(action=Action.LOGOUT)
    with pytest.raises(PermissionError):
        AuditEvent.objects.all().delete()
    with pytest.raises(PermissionError):
        event.delete()
    event.action = Action.LOGOUT
    with pytest.raises(PermissionError):
        event.save()

    assert _rows(logins=True) == [(Action.LOGIN, "staff", "ops", "", "", "")]


def test_audit_admin_is_filterable_and_read_only(staff_client, staff) -> None:
    login = audit_record(action=Action.LOGIN, staff_user=staff)
    audit_record(action=Action.USER_EXPORT, subject="hana")
    changelist = reverse("admin:conversations_auditevent_changelist")

    filtered = staff_client.get(changelist, {"action__exact": "login"})
    by_actor = staff_client.get(changelist, {"actor_kind__exact": "system"})
    page = staff_client.get(reverse("admin:conversations_auditevent_change", args=[login.pk]))
    add = staff_client.get(reverse("admin:conversations_auditevent_add"))
    edit = staff_client.post(
        reverse("admin:conversations_auditevent_change", args=[login.pk]), {"action": "logout"}
    )
    delete = staff_client.post(
        reverse("admin:conversations_auditevent_delete", args=[login.pk]), {"post": "yes"}
    )

    assert filtered.status_code == 200
    assert [e.action for e in filtered.context["cl"].result_list] == ["login", "login"]
    assert [e.subject for e in by_actor.context["cl"].result_list] == ["hana"]
    assert page.status_code == 200
    assert "Save" not in page.content.decode()  # a read-only page
    assert add.status_code == 403
    assert edit.status_code == 403
    assert delete.status_code == 403
    assert _rows(logins=True) == [
        (Action.LOGIN, "staff", "ops", "", "", ""),  # staff_client's own login
        (Action.LOGIN, "staff", "ops", "", "", ""),
        (Action.USER_EXPORT, "system", "", "", "", "hana"),
    ]


def test_export_and_erase_commands_are_audited_as_the_system() -> None:
    EndUser.objects.create(agent=default_agent_row(), external_id="ivan")

    call_command("agentflow_export_user", "ivan", stdout=StringIO())
    call_command("agentflow_erase_user", "ivan", "--yes", stdout=StringIO())

    assert list(
        AuditEvent.objects.order_by("id").values_list("action", "actor_kind", "subject", "route")
    ) == [
        (Action.USER_EXPORT, "system", "", "manage.py agentflow_export_user"),  # its subject erased since
        (Action.USER_ERASE, "system", "", "manage.py agentflow_erase_user"),
    ]
    assert AuditEvent.objects.get(action=Action.USER_ERASE).subject_hash == subject_hash("ivan")
