"""A turn queued with its agent, version and user (``agentflow.jobs.queue_turn``) skips the worker's
first read (``conversations.tasks._agent_of``) when the worker runs that agent at that version; a
task with the message id alone (queued by older code, or by the recovery sweep) still runs, and so
does one whose version this worker does not run (it reads the message's agent, as before)."""

from __future__ import annotations

import time
from typing import Any

import pytest
from celery.signals import before_task_publish

from agentflow.jobs import TURN_TASK, queue_turn
from agentflow.testing.fake_anthropic import FakeReply
from conversations import tasks
from conversations.agents import agent_settings, message_accept
from conversations.models import Message

pytestmark = pytest.mark.django_db(transaction=True)


def _settled(message_id: Any, wait: float = 30) -> Message:
    deadline = time.monotonic() + wait
    while True:
        message = Message.objects.get(pk=message_id)
        if message.status not in (Message.Status.PENDING, Message.Status.PROCESSING):
            return message
        assert time.monotonic() < deadline, f"turn of {message_id} still {message.status}"
        time.sleep(0.05)


@pytest.fixture
def agent_reads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The message ids whose agent a worker read (``_agent_of``)."""
    seen: list[str] = []
    original = tasks._agent_of

    def reading(message_id: str) -> Any:
        seen.append(str(message_id))
        return original(message_id)

    monkeypatch.setattr(tasks, "_agent_of", reading)
    return seen


def _store(user: str, text: str) -> Message:
    limits = agent_settings(name="agentflow")
    return message_accept(limits=limits, user_id=user, message=text).message


def _warm(fake_llm: Any) -> None:
    """One turn, so that the worker has built the default agent (and stored its version)."""
    fake_llm.enqueue(FakeReply(text="Hello."))
    message = _store("hint-warm", "Hello there")
    queue_turn(message.pk)
    assert _settled(message.pk).status == Message.Status.DONE


def test_a_turn_queued_with_its_agent_version_and_user_runs_without_reading_its_agent(
    celery_worker: Any, fake_llm: Any, agent_reads: list[str]
) -> None:
    _warm(fake_llm)
    limits = agent_settings(name="agentflow")
    fake_llm.enqueue(FakeReply(text="Reset it from the sign-in page."))
    message = _store("hint-alice", "My login is broken")

    queue_turn(message.pk, agent=limits.name, version=limits.version, user_pk=message.user_id)
    done = _settled(message.pk)

    assert done.status == Message.Status.DONE
    assert Message.objects.get(reply_to=done, role="assistant").content == "Reset it from the sign-in page."
    assert str(message.pk) not in agent_reads


def test_a_task_with_the_message_id_alone_still_runs_reading_its_agent(
    celery_worker: Any, fake_llm: Any, agent_reads: list[str]
) -> None:
    fake_llm.enqueue(FakeReply(text="It ships tomorrow."))
    message = _store("hint-bob", "Where is my order?")

    queue_turn(message.pk)

    assert _settled(message.pk).status == Message.Status.DONE
    assert str(message.pk) in agent_reads


def test_a_version_this_worker_does_not_run_reads_the_messages_agent(
    celery_worker: Any, fake_llm: Any, agent_reads: list[str]
) -> None:
    _warm(fake_llm)
    limits = agent_settings(name="agentflow")
    fake_llm.enqueue(FakeReply(text="Yes."))
    message = _store("hint-carol", "Can I change my email?")

    queue_turn(message.pk, agent=limits.name, version=limits.version + 7, user_pk=message.user_id)

    assert _settled(message.pk).status == Message.Status.DONE
    assert str(message.pk) in agent_reads


def test_an_agent_the_worker_does_not_know_reads_the_messages_agent(
    celery_worker: Any, fake_llm: Any, agent_reads: list[str]
) -> None:
    fake_llm.enqueue(FakeReply(text="Sure."))
    message = _store("hint-dave", "Can I pay by invoice?")

    queue_turn(message.pk, agent="no-such-agent", version=1, user_pk=message.user_id)

    assert _settled(message.pk).status == Message.Status.DONE
    assert str(message.pk) in agent_reads


def test_a_retried_turn_carries_the_same_arguments(celery_worker: Any, fake_llm: Any, caplog: Any) -> None:
    """Double-texting: the second message's turn waits (retries) until the first is placed."""
    _warm(fake_llm)
    limits = agent_settings(name="agentflow")
    first = _store("hint-erin", "My invoice is wrong")
    second = _store("hint-erin", "It shows last month's plan")
    published: list[tuple[str, dict[str, Any]]] = []

    def on_publish(sender: Any = None, body: Any = None, headers: Any = None, **kwargs: Any) -> None:
        if sender == TURN_TASK and headers and headers.get("retries"):
            published.append((body[0][0], dict(body[1])))

    before_task_publish.connect(on_publish, weak=False)
    try:
        hint = {"agent": limits.name, "version": limits.version, "user_pk": second.user_id}
        queue_turn(second.pk, **hint)
        deadline = time.monotonic() + 20
        while not published:  # the second waits on the first, still pending
            assert time.monotonic() < deadline, "the second message's turn was never retried"
            time.sleep(0.05)
        fake_llm.enqueue(FakeReply(text="Let me check your invoice."))
        fake_llm.enqueue(FakeReply(text="I see the old plan on it."))
        queue_turn(first.pk, **{**hint, "user_pk": first.user_id})
        assert _settled(first.pk).status == Message.Status.DONE
        assert _settled(second.pk).status == Message.Status.DONE
    finally:
        before_task_publish.disconnect(on_publish)

    assert published[0] == (str(second.pk), hint)
    waits = [r.getMessage() for r in caplog.records if r.name == "agentflow.tasks"]
    assert f"process_turn: message {second.pk} waits for an earlier one; again in 0.2 s" in waits
