"""Management commands: agentflow_chat, agentflow_demo, agentflow_services status."""

from __future__ import annotations

import hashlib
import io
import json
import re

import pytest
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management import CommandError, call_command

from agentflow.testing.fake_anthropic import FakeReply
from agentflow_project import runtime
from conversations.models import ApiKey, EndUser, Message
from conversations.services import api_key_check
from intents.models import IntentCategory

transactional = pytest.mark.django_db(transaction=True)


def run(*args: str) -> str:
    out = io.StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


# --- agentflow_chat --------------------------------------------------------------------------


@transactional
def test_chat_prints_the_turn_result_as_json(fake_llm):
    fake_llm.enqueue(FakeReply(text="Let me help with login."))

    result = json.loads(run("agentflow_chat", "--user", "u1", "My login is broken"))

    assert result["content"] == "Let me help with login."
    assert result["status"] == "done"
    assert result["user_id"] == "u1"
    assert result["thread_event"] == "NEW_TOPIC"
    assert result["offline"] is False
    assert result["escalated"] is False
    assert result["intent"] is None  # no intent categories configured in the admin
    stored = Message.objects.get(pk=result["message_id"])
    assert stored.status == Message.Status.DONE and stored.content == "My login is broken"
    assert Message.objects.get(pk=result["reply_id"]).content == "Let me help with login."
    assert fake_llm.requests[0]["body"]["messages"] == [{"role": "user", "content": "My login is broken"}]


@transactional
def test_chat_uses_the_admin_categories(fake_llm):
    run("agentflow_demo", "--admin-password", "demo-pass-123")

    result = json.loads(run("agentflow_chat", "--user", "u2", "Critical: production down"))

    assert result["intent"] == "ESCALATION"
    assert result["escalated"] is True
    assert fake_llm.requests == []


@transactional
def test_chat_without_a_key_is_offline():
    result = json.loads(run("agentflow_chat", "--user", "u3", "My login is broken"))

    assert result["offline"] is True
    assert result["content"].startswith("[Offline mode]")


@transactional
@pytest.mark.parametrize("message", ["", "   \n"])
def test_chat_rejects_an_empty_message(fake_llm, message):
    with pytest.raises(CommandError) as info:
        call_command("agentflow_chat", "--user", "u1", message, stdout=io.StringIO())

    assert str(info.value) == "invalid_input: message must not be empty"
    assert EndUser.objects.count() == 0
    assert Message.objects.count() == 0
    assert fake_llm.requests == []


# --- agentflow_demo --------------------------------------------------------------------------


@pytest.mark.django_db
def test_demo_creates_categories_admin_and_api_key():
    output = run("agentflow_demo")

    rows = {c.name: c for c in IntentCategory.objects.all()}
    assert sorted(rows) == ["ESCALATION", "OUTAGE", "QUERY"]
    assert (rows["QUERY"].threshold, rows["OUTAGE"].threshold, rows["ESCALATION"].threshold) == (
        0.5,
        0.7,
        0.0,
    )
    assert rows["ESCALATION"].handoff is True and rows["OUTAGE"].handoff is False
    assert all(c.active and c.source == IntentCategory.Source.CODE and c.examples for c in rows.values())
    assert "agent agentflow: 3 intent categories created, 3 in all" in output

    password = re.search(r"admin login: admin / (\S+)", output).group(1)
    admin = get_user_model().objects.get(username="admin")
    assert admin.is_superuser and admin.is_staff and admin.check_password(password)

    plain = re.search(r"API key \(X-API-Key\): (\S+)", output).group(1)
    key = ApiKey.objects.get(name="demo")
    assert key.key_hash == hashlib.sha256(plain.encode()).hexdigest()
    assert api_key_check(plain=plain) == key


@pytest.mark.django_db
def test_demo_is_idempotent_and_keeps_admin_edits():
    first = run("agentflow_demo")
    password_hash = get_user_model().objects.get(username="admin").password
    key_hash = ApiKey.objects.get(name="demo").key_hash
    # staff changes in the admin (which records the fields staff own from then on)
    IntentCategory.objects.filter(name="OUTAGE").update(
        threshold=0.85, active=False, staff_edited=["active", "threshold"]
    )

    second = run("agentflow_demo")

    assert IntentCategory.objects.count() == 3
    outage = IntentCategory.objects.get(name="OUTAGE")
    assert (outage.threshold, outage.active) == (0.85, False)
    assert get_user_model().objects.filter(username="admin").count() == 1
    assert get_user_model().objects.get(username="admin").password == password_hash
    assert list(ApiKey.objects.values_list("name", "key_hash")) == [("demo", key_hash)]
    assert "agent agentflow: 0 intent categories created, 3 in all" in second
    assert "admin login: admin (exists" in second and "API key 'demo' exists" in second
    assert "afk_" in first and "afk_" not in second


@pytest.mark.django_db
def test_demo_resets_the_admin_password_when_asked():
    run("agentflow_demo")

    output = run("agentflow_demo", "--admin-password", "new-secret-42")

    assert "admin login: admin / new-secret-42" in output
    assert get_user_model().objects.get(username="admin").check_password("new-secret-42")


# --- agentflow_services ----------------------------------------------------------------------


def test_services_status():
    lines = run("agentflow_services", "status").splitlines()

    assert len(lines) == 2
    postgres, redis = lines
    host = settings.DATABASES["default"]["HOST"]
    assert postgres.startswith("postgres: ")
    assert host in postgres
    if runtime.env_str("DATABASE_URL"):
        assert postgres.endswith("(DATABASE_URL)")
    else:
        assert postgres.endswith("(embedded, running)")
    assert redis == f"redis: {runtime.redacted_url(settings.REDIS_URL)} ({settings.REDIS_SOURCE})"


def test_services_rejects_unknown_actions():
    with pytest.raises(CommandError, match="invalid choice: 'restart'"):
        call_command("agentflow_services", "restart")
