"""REST turn end to end: API -> PostgreSQL -> Celery worker -> channel layer -> response."""

from __future__ import annotations

import pytest
from django.test import AsyncClient

from agentflow.testing.fake_anthropic import FakeReply
from conversations.models import Message, Thread

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]


async def test_rest_turn_runs_through_celery_and_lands_in_postgres(celery_worker, api_key, fake_llm):
    fake_llm.enqueue(FakeReply(text="Let me help with login."))
    client = AsyncClient()
    response = await client.post(
        "/api/users/alice/messages",
        {"message": "My login is broken"},
        content_type="application/json",
        headers={"X-API-Key": api_key},
    )
    assert response.status_code == 200, response.content
    body = response.json()
    stored = await Message.objects.aget(pk=body["message_id"])
    reply = await Message.objects.aget(reply_to=stored)
    thread = await Thread.objects.aget(user__external_id="alice")
    assert (body["status"], body["thread_event"], body["offline"]) == ("done", "NEW_TOPIC", False)
    assert body["content"] == "Let me help with login."
    assert (body["thread_id"], body["reply_id"], body["session_id"]) == (
        str(thread.pk),
        str(reply.pk),
        str(stored.session_id),
    )
    assert (stored.status, stored.thread_id, stored.content) == ("done", thread.pk, "My login is broken")
    assert (reply.role, reply.content, reply.thread_id, reply.model) == (
        "assistant",
        "Let me help with login.",
        thread.pk,
        "claude-sonnet-5-5",
    )
    assert body["usage"] == reply.usage
    assert reply.usage["output_tokens"] == 6  # the fake counts ~4 characters a token: 23 characters
    assert len(fake_llm.requests) == 1
    request = fake_llm.requests[0]
    assert request["headers"]["authorization"] == "Bearer test-key"  # SDK 2.x sends the key as a bearer token
    assert request["body"]["messages"] == [{"role": "user", "content": "My login is broken"}]
    assert request["body"]["model"] == "claude-sonnet-5-5"
    assert "stream" not in request["body"]  # nobody watches a REST turn live: the reply is asked for whole
