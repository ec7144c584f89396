"""REST turn end to end: API -> PostgreSQL -> Celery worker -> channel layer -> response."""

from __future__ import annotations

import pytest
from django.test import AsyncClient

from conversations.models import Message, Thread

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


async def test_rest_turn_runs_through_celery_and_lands_in_postgres(celery_worker, api_key, fake_llm):
    fake_llm.enqueue_text("Let me help with login.") if hasattr(fake_llm, "enqueue_text") else None
    client = AsyncClient()
    response = await client.post(
        "/api/users/alice/messages",
        {"message": "My login is broken"},
        content_type="application/json",
        headers={"X-API-Key": api_key},
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert body["status"] == "done"
    assert body["thread_event"] == "NEW_TOPIC"
    assert body["offline"] is False
    stored = await Message.objects.aget(pk=body["message_id"])
    assert stored.status == "done"
    reply = await Message.objects.aget(reply_to=stored)
    assert reply.content == body["content"]
    assert await Thread.objects.filter(user__external_id="alice").acount() == 1
