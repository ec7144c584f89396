"""Issue 11: every stored user message reaches a terminal state, against the real stack.

A real Celery worker runs the turns; the fake Messages API fails (529) or answers; PostgreSQL holds the
end states. The recovery sweep is called directly with ``now`` or the windows given (beat only calls it
every 30 s); stuck messages are made by writing the state a dead worker leaves behind.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from celery import current_app
from channels.layers import get_channel_layer
from django.core.cache import cache
from django.db import connection
from django.utils import timezone

from agentflow import limits, pipeline
from agentflow.config import DEFAULT_FALLBACK_REPLY
from agentflow.jobs import TURN_TASK
from agentflow.registry import default_agent
from agentflow.testing.fake_anthropic import FakeReply, last_user_text
from conversations import services, tasks
from conversations.events import user_group
from conversations.models import Escalation, Message
from conversations.recovery import UNANSWERED_NOTICE, messages_recover
from tests.faults import refused_pool

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

TURN_TIMEOUT = 30.0


def _accept(user_id: str, text: str) -> Message:
    """Store a user message (pending) the way a transport does, without queueing its turn."""
    return pipeline.accept(default_agent(), user_id=user_id, message=text).message


def _wait_for(check: Callable[[], bool], *, timeout: float = TURN_TIMEOUT) -> None:
    """Poll the database until ``check`` holds (the worker runs the turn on its own thread)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "the expected end state was not reached"
        time.sleep(0.05)


def _status(message: Message) -> str:
    return Message.objects.values_list("status", flat=True).get(pk=message.pk)


def _replies(message: Message) -> list[tuple[str, str]]:
    return list(Message.objects.filter(reply_to=message).values_list("content", "handled_by"))


def _queue(message: Message) -> None:
    current_app.send_task(TURN_TASK, args=[str(message.pk)])


@pytest.fixture
def status_log() -> Iterator[Callable[[Message], list[str]]]:
    """Every status a user message is written with, in order, recorded by a PostgreSQL trigger."""
    table = Message._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE test_status_log (id serial PRIMARY KEY, message_id uuid, status text)")
        cursor.execute(
            """
            CREATE FUNCTION test_log_status() RETURNS trigger AS $$
            BEGIN
                IF NEW.role = 'user' AND (TG_OP = 'INSERT' OR OLD.status IS DISTINCT FROM NEW.status) THEN
                    INSERT INTO test_status_log (message_id, status) VALUES (NEW.id, NEW.status);
                END IF;
                RETURN NEW;
            END $$ LANGUAGE plpgsql
            """
        )
        cursor.execute(
            f"CREATE TRIGGER test_log_status AFTER INSERT OR UPDATE ON {table}"
            " FOR EACH ROW EXECUTE FUNCTION test_log_status()"
        )

    def statuses(message: Message) -> list[str]:
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT status FROM test_status_log WHERE message_id = %s ORDER BY id", [message.pk]
            )
            return [row[0] for row in cursor.fetchall()]

    try:
        yield statuses
    finally:
        with connection.cursor() as cursor:
            cursor.execute(f"DROP TRIGGER IF EXISTS test_log_status ON {table}")
            cursor.execute("DROP FUNCTION IF EXISTS test_log_status()")
            cursor.execute("DROP TABLE IF EXISTS test_status_log")


@pytest.fixture
def no_sdk_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker's agent makes one LLM request per attempt (the task's retries remain)."""
    monkeypatch.setenv("AGENT_LLM_MAX_RETRIES", "0")


# --- the recovery sweep ----------------------------------------------------------------------


def test_a_pending_message_never_queued_is_requeued_and_answered_once(celery_worker, fake_llm) -> None:
    fake_llm.enqueue(FakeReply(text="Found it."))
    message = _accept("r-1", "Where is my parcel?")
    now = timezone.now() + limits.PENDING_GRACE + timedelta(seconds=1)

    assert messages_recover(now=timezone.now()) == {"requeued": 0, "failed": 0, "waiting": 0}  # in grace
    assert messages_recover(now=now) == {"requeued": 1, "failed": 0, "waiting": 0}
    _wait_for(lambda: _status(message) == "done")

    assert _replies(message) == [("Found it.", "llm")]
    assert len(fake_llm.requests) == 1
    assert messages_recover(now=now + timedelta(hours=1)) == {"requeued": 0, "failed": 0, "waiting": 0}


def test_the_sweep_leaves_a_message_its_task_gave_back_for_a_retry(celery_worker, fake_llm) -> None:
    fake_llm.enqueue(FakeReply(text="Answered after the retry."))
    message = _accept("r-14", "Where is my parcel?")
    old = timezone.now() - limits.PENDING_GRACE - timedelta(minutes=5)
    Message.objects.filter(pk=message.pk).update(created_at=old, status="processing")
    services.message_release(message_id=message.pk)  # its task gave it back (LLM or outage retry)
    released = Message.objects.values_list("processing_started_at", flat=True).get(pk=message.pk)
    later = released + limits.PENDING_GRACE + timedelta(seconds=1)

    assert _status(message) == "pending"
    assert messages_recover() == {"requeued": 0, "failed": 0, "waiting": 0}  # its task retries it
    assert messages_recover(now=later) == {"requeued": 1, "failed": 0, "waiting": 0}  # that task is lost
    _wait_for(lambda: _status(message) == "done")

    assert _replies(message) == [("Answered after the retry.", "llm")]


def test_a_database_outage_inside_a_turn_is_retried_not_failed(celery_worker, fake_llm) -> None:
    fake_llm.enqueue(FakeReply(text="Back again."))
    message = _accept("r-15", "Where is my parcel?")
    retried = threading.Event()

    class Retried(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "database unavailable" in record.getMessage():
                retried.set()

    handler = Retried()
    logging.getLogger("agentflow.tasks").addHandler(handler)
    try:
        with refused_pool():  # PostgreSQL is down when the worker takes the turn
            _queue(message)
            assert retried.wait(30)
    finally:
        logging.getLogger("agentflow.tasks").removeHandler(handler)
    _wait_for(lambda: _status(message) == "done")

    assert _replies(message) == [("Back again.", "llm")]
    assert Message.objects.get(pk=message.pk).error == ""


def test_a_stale_claim_of_a_dead_worker_is_taken_over(celery_worker, fake_llm) -> None:
    fake_llm.enqueue(FakeReply(text="Taken over."))
    message = _accept("r-2", "Where is my parcel?")
    dead = timezone.now() - limits.STALE_CLAIM - timedelta(seconds=5)
    Message.objects.filter(pk=message.pk).update(status="processing", processing_started_at=dead)

    assert messages_recover() == {"requeued": 1, "failed": 0, "waiting": 0}
    _wait_for(lambda: _status(message) == "done")

    assert _replies(message) == [("Taken over.", "llm")]


def test_a_live_claim_is_left_alone(celery_worker, fake_llm) -> None:
    message = _accept("r-3", "Where is my parcel?")
    claimed = timezone.now() - timedelta(seconds=10)
    Message.objects.filter(pk=message.pk).update(status="processing", processing_started_at=claimed)

    assert messages_recover() == {"requeued": 0, "failed": 0, "waiting": 0}

    message.refresh_from_db()
    assert (message.status, message.processing_started_at, message.error) == ("processing", claimed, "")
    assert fake_llm.requests == []


def test_a_requeued_message_is_not_requeued_again_within_the_spacing(celery_worker, fake_llm) -> None:
    message = _accept("r-4", "Where is my parcel?")
    # A claim that is refreshed each time (a worker that keeps dying mid-turn) stays stuck.
    dead = timezone.now() - limits.STALE_CLAIM - timedelta(seconds=5)
    Message.objects.filter(pk=message.pk).update(status="processing", processing_started_at=dead)
    cache.set(f"recovery:{message.pk}", {"count": 1, "at": timezone.now().timestamp()})

    assert messages_recover() == {"requeued": 0, "failed": 0, "waiting": 1}
    assert _status(message) == "processing"
    assert fake_llm.requests == []


def test_a_message_requeued_too_often_fails_and_the_client_is_told(celery_worker, fake_llm) -> None:
    message = _accept("r-5", "Where is my parcel?")
    Message.objects.filter(pk=message.pk).update(created_at=timezone.now() - timedelta(minutes=30))
    long_ago = (timezone.now() - timedelta(minutes=10)).timestamp()
    cache.set(f"recovery:{message.pk}", {"count": limits.MAX_REQUEUES, "at": long_ago})
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(user_group(message.user_id), channel)

    assert messages_recover() == {"requeued": 0, "failed": 1, "waiting": 0}
    event = async_to_sync(_receive)(layer, channel)

    message.refresh_from_db()
    assert (message.status, message.error) == (
        "failed",
        "not answered after 3 re-queues (pending over 60 s or a claim older than 300 s each time):"
        " no worker could run this turn",
    )
    assert event == {
        "type": "chat.event",
        "event": {
            "kind": "error",
            "code": "unanswered",
            "message": UNANSWERED_NOTICE,
            "message_id": str(message.pk),
        },
    }
    assert _replies(message) == []
    # Failed is terminal for the sweep: nothing more is queued or changed.
    assert messages_recover() == {"requeued": 0, "failed": 0, "waiting": 0}
    assert _status(message) == "failed"
    assert fake_llm.requests == []


async def _receive(layer: Any, channel: str) -> dict[str, Any]:
    return await asyncio.wait_for(layer.receive(channel), timeout=10)


# --- redelivery and retries ------------------------------------------------------------------


def test_a_redelivered_task_meeting_a_live_claim_retries_instead_of_acking(
    celery_worker, fake_llm, monkeypatch, caplog
) -> None:
    # A short stale-claim window, so the retry comes back within the test.
    monkeypatch.setattr(limits, "STALE_CLAIM", timedelta(seconds=3))
    monkeypatch.setattr(pipeline, "STALE_CLAIM", timedelta(seconds=3))
    fake_llm.enqueue(FakeReply(text="After the claim went stale."))
    message = _accept("r-6", "Where is my parcel?")
    # Another worker claimed it a moment ago and died.
    Message.objects.filter(pk=message.pk).update(status="processing", processing_started_at=timezone.now())

    with caplog.at_level(logging.INFO, logger="agentflow.tasks"):
        _queue(message)  # the broker redelivers the dead worker's task: it meets the live claim
        _wait_for(lambda: _status(message) == "done")

    held = [r.getMessage() for r in caplog.records if "is held by another worker" in r.getMessage()]
    assert len(held) == 1 and held[0].startswith(
        f"process_turn: message {message.pk} is held by another worker"
    )
    assert _replies(message) == [("After the claim went stale.", "llm")]
    assert len(fake_llm.requests) == 1


@pytest.mark.parametrize("status", [429, 529])
def test_failed_is_written_only_after_the_last_llm_attempt(
    celery_worker, fake_llm, no_sdk_retries, status_log, status
) -> None:
    fake_llm.enqueue_error(status, retry_after=0, times=2)
    fake_llm.enqueue(FakeReply(text="Recovered."))
    message = _accept("r-7", "Where is my parcel?")

    _queue(message)
    _wait_for(lambda: _status(message) == "done")

    # Each transient failure gives the message back (pending) for the task's next attempt; never failed.
    assert status_log(message) == [
        "pending",
        "processing",
        "pending",
        "processing",
        "pending",
        "processing",
        "done",
    ]
    assert _replies(message) == [("Recovered.", "llm")]
    assert len(fake_llm.requests) == 3
    assert Escalation.objects.count() == 0


def test_the_task_gives_up_after_a_turn_time_limit(celery_worker, fake_llm, monkeypatch) -> None:
    monkeypatch.setattr(limits, "TURN_SOFT_LIMIT", timedelta(seconds=1))
    fake_llm.latency = 5.0  # the LLM hangs
    message = _accept("r-8", "Where is my parcel?")

    _queue(message)
    _wait_for(lambda: _status(message) == "failed")

    message.refresh_from_db()
    assert message.error == "the turn took longer than 1 s"
    assert _replies(message) == []


def test_a_turn_cancelled_at_the_time_limit_sees_the_reason_not_a_bare_cancellation(monkeypatch) -> None:
    # run_turn marks a cancelled turn failed with str(exc): the cancellation must carry the time limit's
    # reason, or the message reads "CancelledError" until the task's own update lands.
    import asyncio

    from conversations.tasks import _within_limit

    monkeypatch.setattr(limits, "TURN_SOFT_LIMIT", timedelta(seconds=1))
    seen: list[str] = []

    async def slow_turn() -> None:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError as exc:
            seen.append(str(exc))
            raise

    async def quick_turn() -> str:
        return "done"

    with pytest.raises(TimeoutError, match="the turn took longer than 1 s"):
        asyncio.run(_within_limit(slow_turn(), seconds=0.05))
    assert seen == ["the turn took longer than 1 s"]
    assert asyncio.run(_within_limit(quick_turn(), seconds=5)) == "done"


# --- ordering --------------------------------------------------------------------------------


def test_a_failed_earlier_message_does_not_block_a_later_one(celery_worker, fake_llm) -> None:
    fake_llm.enqueue(FakeReply(text="Later answered."))
    earlier = _accept("r-9", "Where is my parcel?")
    Message.objects.filter(pk=earlier.pk).update(status="failed", error="boom")
    later = _accept("r-9", "And my refund?")

    _queue(later)
    _wait_for(lambda: _status(later) == "done")

    assert _replies(later) == [("Later answered.", "llm")]
    assert (_status(earlier), _replies(earlier)) == ("failed", [])


def test_a_stuck_earlier_message_does_not_block_a_later_one(celery_worker, fake_llm, monkeypatch) -> None:
    # Recovery, not threading: one LLM call a turn (placing the parcel question after the refund one
    # may be close enough for the thread scorer to ask the LLM, which would take a queued reply).
    monkeypatch.setenv("AGENT_SESSION_LLM_THREAD_JUDGEMENT", "false")
    fake_llm.enqueue(FakeReply(text="Later answered."))
    fake_llm.enqueue(FakeReply(text="Earlier answered."))
    earlier = _accept("r-10", "Where is my parcel?")
    dead = timezone.now() - limits.STALE_CLAIM - timedelta(seconds=5)
    Message.objects.filter(pk=earlier.pk).update(
        status="processing", processing_started_at=dead, created_at=dead
    )
    later = _accept("r-10", "And my refund?")

    _queue(later)  # the earlier one's worker died long ago: outside ORDER_WINDOW, it blocks nothing
    _wait_for(lambda: _status(later) == "done")
    assert _replies(later) == [("Later answered.", "llm")]
    assert _status(earlier) == "processing"

    assert messages_recover() == {"requeued": 1, "failed": 0, "waiting": 0}  # and the sweep answers it
    _wait_for(lambda: _status(earlier) == "done")
    assert _replies(earlier) == [("Earlier answered.", "llm")]


def test_a_later_message_does_not_wait_for_an_earlier_one_stuck_past_the_grace(
    celery_worker, fake_llm
) -> None:
    def answer(body: dict) -> FakeReply | None:
        if body.get("tool_choice"):  # a thread judgement, if the scorer is unsure: the scorer stands
            return None
        asked = last_user_text(body["messages"])
        return FakeReply(text="Later answered." if "refund" in asked else "Earlier answered.")

    fake_llm.responder = answer  # replies by message, whether or not a judgement comes first
    earlier = _accept("r-11", "Where is my parcel?")  # stored, never queued (its web server died)
    sent = timezone.now() - limits.PENDING_GRACE - timedelta(seconds=30)  # past the grace, in ORDER_WINDOW
    Message.objects.filter(pk=earlier.pk).update(created_at=sent)
    later = _accept("r-11", "And my refund?")

    _queue(later)  # the earlier one is stuck: the later one does not wait for it
    _wait_for(lambda: _status(later) == "done")
    assert _status(earlier) == "pending"
    assert messages_recover() == {"requeued": 1, "failed": 0, "waiting": 0}
    _wait_for(lambda: _status(earlier) == "done")

    assert _replies(later) == [("Later answered.", "llm")]
    assert _replies(earlier) == [("Earlier answered.", "llm")]


def test_a_later_message_does_not_wait_for_an_earlier_one_under_a_stale_claim(
    celery_worker, fake_llm
) -> None:
    earlier = _accept("r-13", "Where is my parcel?")
    Message.objects.filter(pk=earlier.pk).update(  # claimed by a worker that died before placing it
        status="processing", processing_started_at=timezone.now() - limits.STALE_CLAIM - timedelta(seconds=1)
    )
    later = _accept("r-13", "And my refund?")

    _queue(later)
    _wait_for(lambda: _status(later) == "done")

    assert _status(earlier) == "processing"  # the sweep's business, not the later message's


# --- graceful degradation --------------------------------------------------------------------


def test_llm_down_after_the_last_attempt_gives_the_fallback_reply_and_a_hand_off(
    celery_worker, fake_llm, no_sdk_retries, monkeypatch
) -> None:
    monkeypatch.setattr(tasks, "MAX_LLM_RETRIES", 0)  # the first attempt is the last
    fake_llm.enqueue_error(529, retry_after=0)
    message = _accept("r-12", "Where is my parcel?")

    _queue(message)
    _wait_for(lambda: _status(message) == "done")

    message.refresh_from_db()
    reply = Message.objects.get(reply_to=message)
    escalation = Escalation.objects.get(thread_id=message.thread_id)
    assert (message.status, message.escalated, message.error) == ("done", True, "")
    assert (reply.content, reply.handled_by, reply.escalated) == (DEFAULT_FALLBACK_REPLY, "fallback", True)
    assert escalation.status == "open"
    assert escalation.reason.startswith("LLM unavailable: Anthropic API error 529")
    assert len(fake_llm.requests) == 1


def test_a_transient_llm_error_is_retried_and_the_retry_logged(
    celery_worker, fake_llm, no_sdk_retries, caplog
) -> None:
    # Celery's own retry line is off with its task lines (AGENTFLOW_LOG_TASK_LINES): the task logs it.
    fake_llm.enqueue_error(529, retry_after=0)
    fake_llm.enqueue(FakeReply(text="It left the depot today."))
    message = _accept("r-14", "Where is my parcel?")

    _queue(message)
    _wait_for(lambda: _status(message) == "done")

    assert _replies(message) == [("It left the depot today.", "llm")]
    retried = [r for r in caplog.records if r.name == "agentflow.tasks" and str(message.pk) in r.getMessage()]
    assert [
        (r.levelname, "LLM error" in r.getMessage(), "again in 2 s" in r.getMessage()) for r in retried
    ] == [("WARNING", True, True)]


def test_an_open_breaker_skips_the_llm_until_a_trial_call_succeeds(
    celery_worker, fake_llm, no_sdk_retries, monkeypatch
) -> None:
    monkeypatch.setenv("AGENT_FALLBACK_BREAKER_FAILURES", "2")
    monkeypatch.setattr(tasks, "MAX_LLM_RETRIES", 0)
    fake_llm.enqueue_error(500, retry_after=0, times=2)

    answered = []
    for n in range(3):
        message = _accept(f"r-13-{n}", "Where is my parcel?")
        _queue(message)
        _wait_for(lambda m=message: _status(m) == "done")
        answered.append(message)

    # Two failures opened the breaker: the third turn got the fallback without an LLM request.
    assert [_replies(m) for m in answered] == [[(DEFAULT_FALLBACK_REPLY, "fallback")]] * 3
    assert len(fake_llm.requests) == 2
    assert Escalation.objects.count() == 3
    assert cache.get("llm-breaker:agentflow:open") == 1

    # The open time is over (its key expired): one trial call goes through and closes it.
    cache.delete("llm-breaker:agentflow:open")
    fake_llm.enqueue(FakeReply(text="Back."))
    message = _accept("r-13-3", "Where is my parcel?")
    _queue(message)
    _wait_for(lambda: _status(message) == "done")
    assert _replies(message) == [("Back.", "llm")]
    assert cache.get("llm-breaker:agentflow:tripped") is None
