"""Per-user export and erase: the services, the REST routes, the management commands, the admin actions."""

from __future__ import annotations

import json

import pytest
from asgiref.sync import async_to_sync
from django.core.management import call_command
from django.core.management.base import CommandError
from django.test import Client
from django.urls import reverse

from agentflow import AgentFrameworkBuilder
from agentflow.errors import NotFound
from conversations.handoff import escalation_claim, escalation_open
from conversations.models import ChatSession, EndUser, Escalation, Message, Thread, ThreadActivity
from memory.models import Memory
from memory.privacy import user_erase, user_export
from memory.services import memory_add
from tests.conversations.factories import default_agent_row

pytestmark = pytest.mark.django_db

A_TURNS = ["My login is broken", "It says my password is wrong", "Where can I download my invoice?"]
B_TURNS = ["My order never arrived", "It was order for a blue lamp"]
UNAUTHORIZED = {
    "error": {"code": "unauthorized", "message": "send a valid X-API-Key header (or log in as staff)"}
}


@pytest.fixture
def agent():
    # Offline, without the offline escalation: the escalations here are the ones the test opens.
    return (
        AgentFrameworkBuilder()
        .with_intent_categories([])
        .with_config({"fallback_config": {"escalate": False}})
        .build_sync(None)
    )


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_superuser("dana", "dana@example.com", "dana-password-123")


@pytest.fixture
def data(agent, staff):
    """Users A and B with conversations, escalations and memories, and global memories naming them."""
    turns = {}
    for external_id, texts in (("user-a", A_TURNS), ("user-b", B_TURNS)):
        turns[external_id] = [
            async_to_sync(agent.process_message)(user_id=external_id, message=text) for text in texts
        ]
    a = EndUser.objects.get(agent__name="agentflow", external_id="user-a")
    b = EndUser.objects.get(agent__name="agentflow", external_id="user-b")
    a.display_name, a.metadata = "Ann", {"plan": "pro"}
    a.save(update_fields=["display_name", "metadata"])
    a_thread = Thread.objects.get(pk=turns["user-a"][0]["thread_id"])
    b_thread = Thread.objects.get(pk=turns["user-b"][0]["thread_id"])
    a_message = Message.objects.get(pk=turns["user-a"][0]["message_id"])
    b_message = Message.objects.get(pk=turns["user-b"][0]["message_id"])
    a_escalation = escalation_open(thread=a_thread, message=a_message, reason="Wants a human")
    escalation_claim(escalation=a_escalation, staff_user=staff)
    escalation_open(thread=b_thread, message=b_message, reason="Lost parcel")
    embedder = agent.embedder
    memory_add(user=a, kind="preference", content="Prefers email", embedder=embedder, source={"by": "admin"})
    memory_add(user=a, kind="fact", content="Uses the Pro plan", embedder=embedder)
    memory_add(user=b, kind="episodic", content="Lost a blue lamp order", embedder=embedder)
    shared = memory_add(
        user=None,
        agent_id=default_agent_row().pk,
        kind="pattern",
        content="Login issues: reset the password",
        embedder=embedder,
        source={
            "thread": str(a_thread.pk),
            "messages": [str(a_message.pk), str(b_message.pk)],
            "by": "resolution",
            "merged": [{"thread": str(a_thread.pk), "by": "resolution"}, {"thread": str(b_thread.pk)}],
        },
    )
    other = memory_add(
        user=None,
        agent_id=default_agent_row().pk,
        kind="pattern",
        content="Parcels: check the tracking page",
        embedder=embedder,
        source={"thread": str(b_thread.pk), "by": "resolution"},
    )
    return {
        "a": a,
        "b": b,
        "a_thread": a_thread,
        "b_thread": b_thread,
        "a_message": a_message,
        "b_message": b_message,
        "shared": shared,
        "other": other,
    }


def rows_of(user_id: int) -> dict[str, int]:
    return {
        "users": EndUser.objects.filter(pk=user_id).count(),
        "sessions": ChatSession.objects.filter(user_id=user_id).count(),
        "threads": Thread.objects.filter(user_id=user_id).count(),
        "messages": Message.objects.filter(user_id=user_id).count(),
        "activities": ThreadActivity.objects.filter(user_id=user_id).count(),
        "escalations": Escalation.objects.filter(user_id=user_id).count(),
        "memories": Memory.objects.filter(user_id=user_id).count(),
    }


NOTHING = dict.fromkeys(
    ["users", "sessions", "threads", "messages", "activities", "escalations", "memories"], 0
)


# --- export ----------------------------------------------------------------------------------


def test_export_holds_exactly_the_users_rows(data):
    a, b = data["a"], data["b"]

    export = user_export(user=a)

    json.dumps(export)  # serialisable as it is
    counts = rows_of(a.pk)
    assert export["user"] == {
        "external_id": "user-a",
        "display_name": "Ann",
        "metadata": {"plan": "pro"},
        "created_at": a.created_at.isoformat(),
        "last_seen_at": EndUser.objects.get(pk=a.pk).last_seen_at.isoformat(),
    }
    assert len(export["sessions"]) == counts["sessions"] == 1
    assert len(export["threads"]) == counts["threads"] >= 1
    assert len(export["messages"]) == counts["messages"]
    assert len(export["activities"]) == counts["activities"] >= 1
    assert [m["content"] for m in export["messages"] if m["role"] == "user"] == A_TURNS
    assert export["messages"][0]["thread_id"] == str(data["a_thread"].pk)
    assert export["messages"][0]["thread_event"] == "NEW_TOPIC"
    assert {t["id"] for t in export["threads"]} == {
        str(pk) for pk in Thread.objects.filter(user=a).values_list("pk", flat=True)
    }
    assert export["threads"][0]["topic"] == data["a_thread"].topic
    assert export["threads"][0]["status"] == "open"
    assert [(e["status"], e["reason"], e["holder"], e["message_id"]) for e in export["escalations"]] == [
        ("claimed", "Wants a human", "dana", str(data["a_message"].pk))
    ]
    assert "dana@example.com" not in json.dumps(export)
    assert sorted((m["kind"], m["content"]) for m in export["memories"]) == [
        ("fact", "Uses the Pro plan"),
        ("preference", "Prefers email"),
    ]
    assert all("embedding" not in m for m in export["memories"])
    assert {m["source"].get("by") for m in export["memories"]} == {"admin", None}

    text = json.dumps(export)
    for row in [
        *Thread.objects.filter(user=b),
        *Message.objects.filter(user=b),
        *ChatSession.objects.filter(user=b),
    ]:
        assert str(row.pk) not in text
    assert "user-b" not in text and "Lost a blue lamp order" not in text and "Lost parcel" not in text
    assert "Login issues" not in text  # global memories are no one's


# --- erase -----------------------------------------------------------------------------------


def test_erase_removes_every_row_of_the_user_and_nothing_of_anyone_else(data):
    a, b = data["a"], data["b"]
    before_a, before_b = rows_of(a.pk), rows_of(b.pk)
    b_rows = {
        "messages": list(Message.objects.filter(user=b).order_by("pk").values_list("pk", "content")),
        "memories": list(Memory.objects.filter(user=b).values_list("pk", "content")),
    }
    a_ids = {
        "threads": [str(pk) for pk in Thread.objects.filter(user=a).values_list("pk", flat=True)],
        "messages": [str(pk) for pk in Message.objects.filter(user=a).values_list("pk", flat=True)],
    }

    counts = user_erase(user=a)

    assert counts == {**before_a, "global_memories_scrubbed": 1}
    assert rows_of(a.pk) == NOTHING
    assert not Thread.objects.filter(pk__in=a_ids["threads"]).exists()
    assert not Message.objects.filter(pk__in=a_ids["messages"]).exists()
    assert rows_of(b.pk) == before_b
    assert (
        list(Message.objects.filter(user=b).order_by("pk").values_list("pk", "content")) == b_rows["messages"]
    )
    assert list(Memory.objects.filter(user=b).values_list("pk", "content")) == b_rows["memories"]

    shared = Memory.objects.get(pk=data["shared"].pk)
    assert shared.content == "Login issues: reset the password"
    assert shared.source == {
        "messages": [str(data["b_message"].pk)],
        "by": "resolution",
        "merged": [{"by": "resolution"}, {"thread": str(data["b_thread"].pk)}],
    }
    text = json.dumps(list(Memory.objects.values_list("source", flat=True)))
    assert not any(ref in text for ref in [*a_ids["threads"], *a_ids["messages"]])
    assert Memory.objects.get(pk=data["other"].pk).source == {
        "thread": str(data["b_thread"].pk),
        "by": "resolution",
    }


def test_erasing_twice_is_not_found_and_changes_nothing(data):
    user_erase(user=data["a"])
    before_b = rows_of(data["b"].pk)

    with pytest.raises(NotFound):
        user_erase(user=data["a"])

    assert rows_of(data["b"].pk) == before_b


# --- REST ------------------------------------------------------------------------------------


def test_rest_export(data, api_key):
    client = Client()

    ok = client.get("/api/users/user-a/export", headers={"X-API-Key": api_key})
    missing = client.get("/api/users/nobody/export", headers={"X-API-Key": api_key})
    anonymous = client.get("/api/users/user-a/export")

    assert ok.status_code == 200
    body = ok.json()
    assert body["user"]["external_id"] == "user-a"
    assert [m["content"] for m in body["messages"] if m["role"] == "user"] == A_TURNS
    assert len(body["memories"]) == 2
    assert missing.status_code == 404
    assert missing.json() == {"error": {"code": "not_found", "message": "user 'nobody' not found"}}
    assert anonymous.status_code == 401
    assert anonymous.json() == UNAUTHORIZED


def test_rest_erase(data, api_key):
    client = Client()
    a_pk, before_a, before_b = data["a"].pk, rows_of(data["a"].pk), rows_of(data["b"].pk)

    anonymous = client.delete("/api/users/user-a")
    assert anonymous.status_code == 401 and rows_of(a_pk) == before_a

    first = client.delete("/api/users/user-a", headers={"X-API-Key": api_key})
    second = client.delete("/api/users/user-a", headers={"X-API-Key": api_key})

    assert first.status_code == 200
    assert first.json() == {"erased": {**before_a, "global_memories_scrubbed": 1}}
    assert rows_of(a_pk) == NOTHING
    assert rows_of(data["b"].pk) == before_b
    assert second.status_code == 404
    assert second.json() == {"error": {"code": "not_found", "message": "user 'user-a' not found"}}


# --- management commands ---------------------------------------------------------------------


def test_export_command_to_stdout_and_to_a_file(data, tmp_path, capsys):
    call_command("agentflow_export_user", "user-a")
    printed = json.loads(capsys.readouterr().out)
    target = tmp_path / "a.json"
    call_command("agentflow_export_user", "user-a", "--output", str(target))
    written = json.loads(target.read_text())

    for export in (printed, written):
        assert export["user"]["external_id"] == "user-a"
        assert [m["content"] for m in export["messages"] if m["role"] == "user"] == A_TURNS
    assert capsys.readouterr().out == ""


def test_export_command_unknown_user():
    with pytest.raises(CommandError, match="no user 'nobody': nothing exported"):
        call_command("agentflow_export_user", "nobody")


def test_erase_command_needs_yes(data, capsys):
    before = rows_of(data["a"].pk)

    with pytest.raises(CommandError, match="Nothing was erased"):
        call_command("agentflow_erase_user", "user-a")
    assert rows_of(data["a"].pk) == before

    call_command("agentflow_erase_user", "user-a", "--yes")
    assert json.loads(capsys.readouterr().out) == {"erased": {**before, "global_memories_scrubbed": 1}}
    assert rows_of(data["a"].pk) == NOTHING

    with pytest.raises(CommandError, match="no user 'user-a': nothing erased"):
        call_command("agentflow_erase_user", "user-a", "--yes")


# --- admin actions ---------------------------------------------------------------------------


def _action(client: Client, action: str, users: list[EndUser], **extra: str):
    return client.post(
        reverse("admin:conversations_enduser_changelist"),
        {"action": action, "_selected_action": [u.pk for u in users], **extra},
    )


def test_admin_export_action_downloads_the_selected_users(data, client, staff):
    client.force_login(staff)

    response = _action(client, "export_users", [data["a"], data["b"]])

    assert response.status_code == 200
    assert response["Content-Type"] == "application/json"
    assert response["Content-Disposition"].startswith('attachment; filename="agentflow-users-')
    body = json.loads(response.content)
    assert [u["user"]["external_id"] for u in body["users"]] == ["user-a", "user-b"]
    assert [m["content"] for m in body["users"][1]["messages"] if m["role"] == "user"] == B_TURNS


def test_admin_erase_action_confirms_then_erases(data, client, staff):
    client.force_login(staff)
    before_a, before_b = rows_of(data["a"].pk), rows_of(data["b"].pk)

    confirm = _action(client, "erase_users", [data["a"]])
    assert confirm.status_code == 200
    assert "Erase users and all their data?" in confirm.content.decode()
    assert rows_of(data["a"].pk) == before_a

    done = _action(client, "erase_users", [data["a"]], confirm="yes")

    assert done.status_code == 302
    assert rows_of(data["a"].pk) == NOTHING
    assert rows_of(data["b"].pk) == before_b
    shown = [str(m) for m in done.wsgi_request._messages]
    assert shown == [
        f"Erased 1 user(s): 1 users, {before_a['sessions']} sessions, {before_a['threads']} threads, "
        f"{before_a['messages']} messages, {before_a['activities']} activities, "
        f"{before_a['escalations']} escalations, {before_a['memories']} memories, "
        "1 global memories scrubbed."
    ]
