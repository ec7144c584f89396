"""The database is the source of truth for intent categories: admin edits reach running agents."""

from __future__ import annotations

import pytest
from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.test import AsyncClient, Client

from agentflow import AgentFrameworkBuilder, IntentCategory
from intents.models import IntentCategory as Row
from tests.conversations.factories import default_agent_row

CATEGORIES = [
    IntentCategory("OUTAGE", "Production issues", ["Service is down", "Error 500 on every request"]),
    IntentCategory("BILLING", "Invoices and charges", ["I was charged twice", "Where is my invoice?"]),
]


def _admin_client() -> Client:
    user = get_user_model().objects.create_superuser("ops", "ops@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def _admin_post(client: Client, row: Row, **changes) -> int:
    data = {
        "agent": row.agent_id,
        "name": row.name,
        "description": row.description,
        "examples": "\n".join(row.examples),
        "threshold": "" if row.threshold is None else row.threshold,
        "system_prompt": row.system_prompt,
        **{k: v for k, v in changes.items() if v is not None},
    }
    for flag in ("handoff", "active"):
        value = changes.get(flag, getattr(row, flag))
        if value:
            data[flag] = "on"
        else:
            data.pop(flag, None)
    response = client.post(f"/admin/intents/intentcategory/{row.pk}/change/", data)
    return response.status_code


@pytest.mark.django_db(transaction=True)
async def test_an_admin_edit_applies_to_the_next_message_of_a_built_agent() -> None:
    agent = await AgentFrameworkBuilder().with_intent_categories(CATEGORIES).build(None)
    before = await agent.process_message(user_id="u1", message="The service is down for everyone")
    # Offline (no key): the offline reply escalates too; the category's hand-off shows in handled_by.
    assert (before["intent"], before["handled_by"]) == ("OUTAGE", "offline")

    row = await Row.objects.aget(name="OUTAGE")
    client = await sync_to_async(_admin_client)()
    assert await sync_to_async(_admin_post)(client, row, handoff=True) == 302

    after = await agent.process_message(user_id="u2", message="The service is down for everyone")
    assert (after["intent"], after["escalated"], after["handled_by"]) == ("OUTAGE", True, "handoff")


@pytest.mark.django_db(transaction=True)
async def test_categories_added_or_deactivated_in_the_admin_change_classification() -> None:
    agent = await AgentFrameworkBuilder().with_intent_categories(CATEGORIES).build(None)
    await Row.objects.acreate(
        agent_id=agent.record_id,
        name="SHIPPING",
        description="Parcels and delivery",
        examples=["Where is my parcel?", "Track my delivery"],
    )
    assert (await agent.classify("Where is my parcel? It has not arrived")).intent == "SHIPPING"

    shipping = await Row.objects.aget(name="SHIPPING")
    shipping.active = False
    await shipping.asave()

    assert (await agent.classify("Where is my parcel? It has not arrived")).intent != "SHIPPING"
    categories = await sync_to_async(lambda: agent.categories)()  # a database read
    assert {c.name for c in categories} == {"OUTAGE", "BILLING"}


@pytest.mark.django_db(transaction=True)
async def test_a_threshold_in_code_applies_until_staff_change_it_then_staff_win_with_a_warning(
    caplog,
) -> None:
    await (
        AgentFrameworkBuilder()
        .with_intent_categories(CATEGORIES)
        .with_confidence_thresholds({"OUTAGE": 0.7})
        .build(None)
    )
    row = await Row.objects.aget(name="OUTAGE")
    assert (row.threshold, row.source, row.staff_edited) == (0.7, "code", [])

    agent = (
        await AgentFrameworkBuilder()
        .with_intent_categories(CATEGORIES)
        .with_confidence_thresholds({"OUTAGE": 0.8})
        .build(None)
    )
    assert (await Row.objects.aget(name="OUTAGE")).threshold == 0.8  # no staff edit: code applies
    assert agent.config.confidence_config.intent_specific == {"OUTAGE": 0.8}

    client = await sync_to_async(_admin_client)()
    assert await sync_to_async(_admin_post)(client, row, threshold="0.2") == 302
    with caplog.at_level("WARNING", logger="agentflow.intents"):
        agent = await (
            AgentFrameworkBuilder()
            .with_intent_categories(CATEGORIES)
            .with_confidence_thresholds({"OUTAGE": 0.9})
            .build(None)
        )

    row = await Row.objects.aget(name="OUTAGE")
    assert (row.threshold, row.staff_edited) == (0.2, ["threshold"])
    assert [r.getMessage() for r in caplog.records] == [
        "agent agentflow, intent OUTAGE: code sets threshold = 0.9 but staff set 0.2 in the admin; "
        "the staff value wins (the admin action 'Let code set these categories' fields again' hands it back to code)"
    ]
    described = await sync_to_async(agent.describe)()
    outage = next(c for c in described["categories"] if c["name"] == "OUTAGE")
    assert (outage["threshold"], outage["threshold_source"]) == (0.2, "staff")
    assert described["sources"]["confidence_config.intent_specific.OUTAGE"] == "code"


@pytest.mark.django_db
def test_staff_rewording_a_code_category_takes_it_over() -> None:
    from intents.services import intent_categories_sync

    intent_categories_sync(agent=default_agent_row(), categories=CATEGORIES)
    row = Row.objects.get(name="BILLING")
    client = _admin_client()

    assert _admin_post(client, row, examples="Double charge on my card\nInvoice missing") == 302

    row.refresh_from_db()
    assert (row.source, row.examples) == ("admin", ["Double charge on my card", "Invoice missing"])
    intent_categories_sync(agent=default_agent_row(), categories=CATEGORIES)  # a later deploy
    row.refresh_from_db()
    assert row.examples == ["Double charge on my card", "Invoice missing"]


@pytest.mark.django_db(transaction=True)
@pytest.mark.integration
async def test_an_admin_edit_reaches_a_running_worker(celery_worker, api_key) -> None:
    from intents.services import intent_categories_sync

    await sync_to_async(intent_categories_sync)(
        agent=await sync_to_async(default_agent_row)(), categories=CATEGORIES
    )
    client = AsyncClient()

    async def post(user: str) -> dict:
        response = await client.post(
            f"/api/users/{user}/messages",
            {"message": "The service is down for everyone"},
            content_type="application/json",
            headers={"X-API-Key": api_key},
        )
        assert response.status_code == 200, response.content
        return response.json()

    before = await post("w1")
    row = await Row.objects.aget(name="OUTAGE")
    row.threshold = 0.0  # "always a human"
    await row.asave()
    after = await post("w2")

    # Offline (no key): the offline reply escalates too; the category's hand-off shows in handled_by.
    assert (before["intent"], before["handled_by"]) == ("OUTAGE", "offline")
    assert (after["intent"], after["escalated"], after["handled_by"]) == ("OUTAGE", True, "handoff")
