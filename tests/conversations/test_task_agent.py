"""A worker reads the agent of the message it runs (``conversations.tasks._agent_of``): one compiled
query per turn; an id that is no message (or no UUID at all) is "not found", never a crash."""

from __future__ import annotations

import uuid

import pytest

from agentflow import pipeline
from agentflow.errors import NotFound
from agentflow.registry import default_agent
from conversations.tasks import _agent_of

pytestmark = pytest.mark.django_db


def test_the_turns_agent_and_user_come_from_the_message() -> None:
    agent = default_agent()
    message = pipeline.accept(agent, user_id="task-agent-user", message="My printer is offline").message

    for _ in range(3):  # the first run compiles the query; later ones reuse it
        found, user_pk = _agent_of(str(message.pk))
        assert (found.name, user_pk) == (agent.name, message.user_id)


@pytest.mark.parametrize("message_id", [str(uuid.uuid4()), "not-a-uuid", ""])
def test_an_id_that_is_no_user_message_is_not_found(message_id: str) -> None:
    with pytest.raises(NotFound, match="not found"):
        _agent_of(message_id)
