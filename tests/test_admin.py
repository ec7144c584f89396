"""The ops console (Django admin) as a logged-in superuser."""

from __future__ import annotations

import hashlib
import re

import pytest
from asgiref.sync import async_to_sync
from django.urls import reverse

from agentflow import AgentFrameworkBuilder
from agentflow import IntentCategory as Spec
from agentflow.embeddings import get_embedder
from conversations.models import ApiKey, ChatSession, EndUser, Message, Thread
from conversations.services import api_key_check, api_key_create
from intents.models import IntentCategory
from memory.models import Memory
from memory.selectors import memory_search
from memory.services import memory_add
from tests.conversations.factories import default_agent_row

pytestmark = pytest.mark.django_db

MODELS = [
    ("conversations", "enduser"),
    ("conversations", "chatsession"),
    ("conversations", "thread"),
    ("conversations", "message"),
    ("conversations", "apikey"),
    ("intents", "intentcategory"),
    ("memory", "memory"),
]


@pytest.fixture
def staff_client(client, django_user_model):
    admin = django_user_model.objects.create_superuser("ops", "ops@example.com", "ops-password-123")
    client.force_login(admin)
    return client


@pytest.fixture
def rows():
    """One real (offline) conversation, a memory of each scope and an API key."""
    agent = (
        AgentFrameworkBuilder()
        .with_intent_categories(
            [Spec("ACCOUNT", "Login problems", ["My login is broken", "I can't sign in"])]
        )
        .build_sync(None)
    )
    first = async_to_sync(agent.process_message)(user_id="alice", message="My login is broken")
    async_to_sync(agent.process_message)(user_id="alice", message="It says my password is wrong")
    user = EndUser.objects.get(agent__name="agentflow", external_id="alice")
    memory_add(user=user, kind="preference", content="Prefers email", embedder=agent.embedder)
    memory_add(
        user=None,
        agent_id=default_agent_row().pk,
        kind="pattern",
        content="Login issues: clear cookies first",
        embedder=agent.embedder,
    )
    api_key_create(name="host-backend")
    return {
        "enduser": user,
        "chatsession": ChatSession.objects.get(pk=first["session_id"]),
        "thread": Thread.objects.get(pk=first["thread_id"]),
        "message": Message.objects.get(pk=first["message_id"]),
        "apikey": ApiKey.objects.get(name="host-backend"),
        "intentcategory": IntentCategory.objects.get(name="ACCOUNT"),
        "memory": Memory.objects.get(user=user),
    }


@pytest.mark.parametrize(("app", "model"), MODELS)
def test_changelist_and_change_pages(staff_client, rows, app, model):
    changelist = staff_client.get(reverse(f"admin:{app}_{model}_changelist"))
    assert changelist.status_code == 200
    assert changelist.context["cl"].result_count >= 1

    obj = rows[model]
    change = staff_client.get(reverse(f"admin:{app}_{model}_change", args=[obj.pk]))
    assert change.status_code == 200
    assert change.context["original"] == obj


def test_changelist_search_and_filters(staff_client, rows):
    threads = staff_client.get(
        reverse("admin:conversations_thread_changelist"), {"q": "alice", "status": "open"}
    )
    messages = staff_client.get(reverse("admin:conversations_message_changelist"), {"role": "user"})
    memories = staff_client.get(reverse("admin:memory_memory_changelist"), {"user__isempty": "1"})

    assert [t.pk for t in threads.context["cl"].result_list] == [rows["thread"].pk]
    assert {m.role for m in messages.context["cl"].result_list} == {"user"}
    assert messages.context["cl"].result_count == 2
    assert [m.content for m in memories.context["cl"].result_list] == ["Login issues: clear cookies first"]


def test_thread_page_is_its_timeline(staff_client, rows):
    page = staff_client.get(reverse("admin:conversations_thread_change", args=[rows["thread"].pk]))

    content = page.content.decode()
    assert "My login is broken" in content and "It says my password is wrong" in content
    assert "[Offline mode]" in content


def test_messages_cannot_be_added(staff_client):
    assert staff_client.get(reverse("admin:conversations_message_add")).status_code == 403


def test_header_shows_offline_mode_without_a_key(staff_client, settings):
    assert settings.ANTHROPIC_API_KEY == ""

    page = staff_client.get(reverse("admin:index"))

    assert page.status_code == 200
    html = page.content.decode()
    assert "AgentFlow ops console — OFFLINE MODE" in html
    assert 'title="No ANTHROPIC_API_KEY is set' in html
    # The dashboards row's link stays one word wide (it wrapped letter by letter at 1280 px).
    assert f'<th scope="row" style="white-space: nowrap"><a href="{reverse("agentflow-analytics")}">' in html


def test_admin_requires_staff(client):
    response = client.get(reverse("admin:conversations_message_changelist"))

    assert response.status_code == 302
    assert response["Location"].startswith(reverse("admin:login"))


# --- intent categories -----------------------------------------------------------------------


def category_form(**overrides):
    data = {
        "agent": str(default_agent_row().pk),
        "name": "ORDER_STATUS",
        "description": "Order tracking",
        "examples": "Where is my order\n\n  Delivery status  \nTrack my package\n",
        "threshold": "0.6",
        "system_prompt": "",
        "active": "on",
    }
    data.update(overrides)
    return data


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"name": "bad name!"}, "name"),
        ({"threshold": "1.5"}, "threshold"),
        ({"threshold": "-0.1"}, "threshold"),
        ({"threshold": "high"}, "threshold"),
        ({"name": ""}, "name"),
    ],
)
def test_intent_category_form_rejects_bad_values(staff_client, overrides, field):
    response = staff_client.post(reverse("admin:intents_intentcategory_add"), category_form(**overrides))

    assert response.status_code == 200
    assert field in response.context["adminform"].form.errors
    assert IntentCategory.objects.count() == 0


def test_intent_category_add_stores_examples_as_a_list(staff_client):
    response = staff_client.post(reverse("admin:intents_intentcategory_add"), category_form())

    assert response.status_code == 302
    category = IntentCategory.objects.get(name="ORDER_STATUS")
    assert category.examples == ["Where is my order", "Delivery status", "Track my package"]
    assert category.threshold == 0.6
    assert category.active is True and category.handoff is False
    assert category.source == IntentCategory.Source.ADMIN

    page = staff_client.get(reverse("admin:intents_intentcategory_change", args=[category.pk]))
    assert (
        page.context["adminform"].form.initial["examples"]
        == "Where is my order\nDelivery status\nTrack my package"
    )


def test_intent_category_edit_keeps_validation(staff_client):
    category = IntentCategory.objects.create(
        agent=default_agent_row(), name="QUERY", description="q", examples=["How do I"], threshold=0.5
    )
    url = reverse("admin:intents_intentcategory_change", args=[category.pk])

    rejected = staff_client.post(url, category_form(name="QUERY", threshold="2"))
    accepted = staff_client.post(url, category_form(name="QUERY", threshold="", examples="What is\nHow do I"))

    assert "threshold" in rejected.context["adminform"].form.errors
    assert accepted.status_code == 302
    category.refresh_from_db()
    assert (category.threshold, category.examples) == (None, ["What is", "How do I"])


def test_intent_category_list_editable_rejects_out_of_range_threshold(staff_client):
    category = IntentCategory.objects.create(
        agent=default_agent_row(), name="QUERY", description="q", examples=["How do I"], threshold=0.5
    )

    response = staff_client.post(
        reverse("admin:intents_intentcategory_changelist"),
        {
            "form-TOTAL_FORMS": "1",
            "form-INITIAL_FORMS": "1",
            "form-MIN_NUM_FORMS": "0",
            "form-MAX_NUM_FORMS": "1000",
            "form-0-id": str(category.pk),
            "form-0-active": "on",
            "form-0-threshold": "1.5",
            "_save": "Save",
        },
    )

    assert response.status_code == 200
    assert response.context["cl"].formset.errors[0]
    category.refresh_from_db()
    assert category.threshold == 0.5


# --- API keys --------------------------------------------------------------------------------


def test_api_key_plain_value_is_shown_once_and_only_its_hash_is_stored(staff_client):
    response = staff_client.post(
        reverse("admin:conversations_apikey_add"), {"name": "partner-site", "active": "on"}, follow=True
    )

    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"]]
    assert len(shown) == 2  # the key, then Django's "added successfully"
    plain = re.fullmatch(
        r"The new API key is (afk_\S+) - copy it now, it is not shown again\.", shown[0]
    ).group(1)
    key = ApiKey.objects.get(name="partner-site")
    assert key.key_hash == hashlib.sha256(plain.encode()).hexdigest()
    assert key.prefix == plain[:12]
    assert plain not in {key.name, key.prefix, key.key_hash}
    assert api_key_check(plain=plain) == key
    assert ApiKey.objects.count() == 1

    page = staff_client.get(reverse("admin:conversations_apikey_change", args=[key.pk]))
    assert plain not in page.content.decode()


def test_api_key_edit_keeps_the_key(staff_client):
    key, plain = api_key_create(name="partner-site")

    response = staff_client.post(
        reverse("admin:conversations_apikey_change", args=[key.pk]), {"name": "partner-site-renamed"}
    )

    assert response.status_code == 302
    key.refresh_from_db()
    assert (key.name, key.active) == ("partner-site-renamed", False)
    assert key.key_hash == hashlib.sha256(plain.encode()).hexdigest()
    assert api_key_check(plain=plain) is None  # deactivated
    assert ApiKey.objects.count() == 1


# --- memories --------------------------------------------------------------------------------


def test_memory_added_in_the_admin_is_searchable(staff_client):
    embedder = get_embedder()
    user = EndUser.objects.create(agent=default_agent_row(), external_id="bob")

    response = staff_client.post(
        reverse("admin:memory_memory_add"),
        {
            "user": str(user.pk),
            "kind": "preference",
            "content": "Bob wants replies in French",
            "source": "{}",
        },
    )

    assert response.status_code == 302
    memory = Memory.objects.get()
    assert memory.embedding_model == embedder.model_id
    found = memory_search(
        user=user,
        embedding=embedder.embed_one("Bob wants replies in French"),
        limit=1,
        similarity_threshold=0.99,
    )
    assert [m["id"] for m in found] == [str(memory.pk)]


def test_memory_edited_in_the_admin_is_re_embedded(staff_client):
    embedder = get_embedder()
    memory = memory_add(
        user=None,
        agent_id=default_agent_row().pk,
        kind="fact",
        content="The office closes at 5pm",
        embedder=embedder,
    )

    response = staff_client.post(
        reverse("admin:memory_memory_change", args=[memory.pk]),
        {
            "user": "",
            "kind": "fact",
            "content": "Support is open around the clock",
            "source": "{}",
        },
    )

    assert response.status_code == 302
    someone = EndUser.objects.create(agent=default_agent_row(), external_id="carol")
    found = memory_search(
        user=someone,
        embedding=embedder.embed_one("Support is open around the clock"),
        limit=1,
        similarity_threshold=0.99,
    )
    assert [(m["id"], m["content"]) for m in found] == [(str(memory.pk), "Support is open around the clock")]
