"""The reads every REST or WebSocket turn makes in the web process, compiled once per connection.

The API key, the agent's record, a resent message's earlier copy and the turn's result are read with
``agentflow.prepared`` queries. These tests pin that they answer as the ORM did (same rows, same
misses, scoped to the user and agent) and in one statement each.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from agentflow.errors import NotFound
from conversations.agents import agent_get
from conversations.models import Agent, ApiKey, Message
from conversations.selectors import turn_result, turn_result_for
from conversations.services import api_key_check, api_key_create, message_receive

from .factories import EndUserFactory, MessageFactory, default_agent_row

pytestmark = pytest.mark.django_db


def _orm_turn_result(message: Message) -> dict:
    """The result as the plain ORM reads it (the message afresh, its reply looked up)."""
    return turn_result(message=Message.objects.select_related("user").get(pk=message.pk))


def test_the_turn_result_is_read_in_one_query_and_matches_the_orm_with_and_without_a_reply() -> None:
    answered = MessageFactory(status=Message.Status.DONE, intent="orders", confidence=0.9)
    reply = MessageFactory(
        thread=answered.thread,
        role=Message.Role.ASSISTANT,
        reply_to=answered,
        content="It ships tomorrow.",
        handled_by="llm",
        usage={"input_tokens": 3, "output_tokens": 4},
    )
    pending = MessageFactory(thread=answered.thread, status=Message.Status.PENDING)
    handed = MessageFactory(thread=answered.thread, status=Message.Status.DONE, handled_by="human")

    for message in (answered, pending, handed):
        with CaptureQueriesContext(connection) as queries:
            result = turn_result_for(message_id=message.pk)
        assert len(queries) == 1, [q["sql"] for q in queries]
        assert result == _orm_turn_result(message)
    # Read twice on one connection (the compiled statement again), and by its id as text.
    assert turn_result_for(message_id=str(answered.pk)) == _orm_turn_result(answered)
    assert turn_result_for(message_id=answered.pk)["reply_id"] == str(reply.pk)
    assert "reply_id" not in turn_result_for(message_id=pending.pk)
    assert turn_result_for(message_id=handed.pk)["handled_by"] == "human"


def test_the_turn_result_of_an_unknown_message_raises_does_not_exist() -> None:
    MessageFactory()
    with pytest.raises(Message.DoesNotExist):
        turn_result_for(message_id="5a0c1c7e-0000-4000-8000-000000000000")
    with pytest.raises(Message.DoesNotExist):
        turn_result_for(message_id="not-a-uuid")


def test_an_api_key_is_found_only_while_active_and_only_by_its_own_secret() -> None:
    key, plain = api_key_create(name="reads-a")
    other, other_plain = api_key_create(name="reads-b")

    assert api_key_check(plain=plain) == key
    assert api_key_check(plain=other_plain) == other
    assert api_key_check(plain=plain + "x") is None
    # Recently used: checking it again is one statement (no write).
    with CaptureQueriesContext(connection) as queries:
        assert api_key_check(plain=plain) == key
    assert len(queries) == 1
    ApiKey.objects.filter(pk=key.pk).update(active=False)
    assert api_key_check(plain=plain) is None
    assert api_key_check(plain=other_plain) == other
    # Last use is still written at most once a minute.
    ApiKey.objects.filter(pk=other.pk).update(last_used_at=timezone.now() - timedelta(minutes=5))
    api_key_check(plain=other_plain)
    other.refresh_from_db()
    assert other.last_used_at is not None and timezone.now() - other.last_used_at < timedelta(minutes=1)


def _receive(agent: Agent, user_id: str, client_id: str, text: str = "Where is my order?"):
    return message_receive(
        agent_id=agent.pk,
        user_id=user_id,
        content=text,
        client_message_id=client_id,
        ttl_seconds=3600,
        max_chars=4000,
    )


def test_a_resent_client_message_id_finds_the_first_copy_of_that_user_and_agent_only() -> None:
    agent = default_agent_row()
    other_agent = Agent.objects.create(name="reads-other")
    first = _receive(agent, "alice", "c-1")
    assert first.created

    again = _receive(agent, "alice", "c-1", text="something else")
    assert (again.message.pk, again.created) == (first.message.pk, False)
    # The same client id from another user, or for another agent, is another message.
    bob = _receive(agent, "bob", "c-1")
    elsewhere = _receive(other_agent, "alice", "c-1")
    assert bob.created and elsewhere.created
    assert len({first.message.pk, bob.message.pk, elsewhere.message.pk}) == 3
    assert _receive(agent, "bob", "c-1").message.pk == bob.message.pk
    assert _receive(other_agent, "alice", "c-1").message.pk == elsewhere.message.pk


def test_an_agent_is_read_by_its_exact_name() -> None:
    agent = default_agent_row()
    EndUserFactory(agent=agent)
    assert agent_get(name=agent.name) == agent
    with pytest.raises(NotFound):
        agent_get(name="no-such-agent")
