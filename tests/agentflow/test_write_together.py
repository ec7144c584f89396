"""Several writes in one statement (agentflow.prepared.write_together): the rows the ORM would write,
all or nothing, foreign keys checked at commit; and the turn's writes that use it."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models.signals import post_save
from django.utils import timezone

from agentflow.prepared import Increment, Insert, Update, write_together
from conversations import turns
from conversations.models import EMBEDDING_DIMENSIONS, Message, Thread, ThreadActivity
from conversations.services import thread_activity_new, thread_new
from memory.models import Memory
from memory.services import memories_use_writes
from tests.conversations.factories import ChatSessionFactory, MessageFactory, ThreadFactory

pytestmark = pytest.mark.django_db


@contextmanager
def _statements() -> Iterator[list[str]]:
    seen: list[str] = []

    def spy(execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        if "SAVEPOINT" not in sql:  # the test's transaction makes each atomic block a savepoint
            seen.append(sql)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(spy):
        yield seen


def _row(model: type, pk: object) -> dict[str, object]:
    return model.objects.filter(pk=pk).values().get()  # type: ignore[attr-defined, no-any-return]


def _vector(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(EMBEDDING_DIMENSIONS).astype(np.float32)
    return v / np.linalg.norm(v)


def _assert_a_retried_finish_writes_nothing(
    message: Message, reply: Message, fields: dict[str, Any], thread_before: dict[str, object]
) -> None:
    """A retried run (a worker died after the commit) comes back with its own reply: nothing changes."""
    retried = Message.objects.select_related("thread").get(pk=message.pk)
    retried.status = Message.Status.PROCESSING
    again = turns.turn_finish(
        message=retried, reply_fields={**fields, "content": "Another reply"}, escalation_reason=""
    )
    assert again is None and retried.status == Message.Status.DONE
    assert list(Message.objects.filter(reply_to=message).values_list("pk", "content")) == [
        (reply.pk, "Here is how")
    ]
    assert _row(Thread, message.thread_id) == thread_before


def _a_second_reply() -> tuple[Message, Message]:
    """A message marked done in memory, with a stored reply and an unsaved second one (a unique violation)."""
    message = MessageFactory(status=Message.Status.PROCESSING)
    Message.objects.create(
        user=message.user, session=message.session, thread=message.thread, reply_to=message, role="assistant"
    )
    reply = Message(
        user=message.user, session=message.session, thread=message.thread, reply_to=message, role="assistant"
    )
    message.status = Message.Status.DONE
    return message, reply


def test_writes_store_the_rows_the_orm_stores_in_one_statement() -> None:
    session = ChatSessionFactory()
    message = MessageFactory(thread=None, session=session, user=session.user, content="my card is blocked")
    now = timezone.now()
    for round_ in range(2):  # the second reuses the compiled statement
        thread = thread_new(
            user=message.user,
            session=message.session,
            text=message.content,
            embedding=_vector(round_),
            now=now,
        )
        message.thread, message.intent = thread, f"CARD_{round_}"
        first = thread_activity_new(thread=thread, kind=ThreadActivity.Kind.OPENED, message=message)
        second = thread_activity_new(thread=thread, kind=ThreadActivity.Kind.REOPENED, message=message)
        with _statements() as seen:
            write_together(Insert(thread), Update(message, ["thread", "intent"]), Insert(first, second))
        assert len(seen) == 1 and seen[0].startswith("WITH ")
        # The database's keys came back, in the order of the rows: the timeline's order.
        assert isinstance(first.pk, int) and second.pk > first.pk
        assert not thread._state.adding and not first._state.adding
        assert first.created_at <= second.created_at
        stored = Thread.objects.get(pk=thread.pk)
        assert (stored.topic, stored.topic_weight, stored.last_activity_at) == ("my card is blocked", 1, now)
        assert np.allclose(stored.topic_embedding, _vector(round_), atol=1e-6)
        assert _row(Message, message.pk)["thread_id"] == thread.pk
        assert _row(Message, message.pk)["intent"] == f"CARD_{round_}"
        assert [
            (a.kind, a.message_id) for a in ThreadActivity.objects.filter(thread=thread).order_by("pk")
        ] == [
            ("opened", message.pk),
            ("reopened", message.pk),
        ]


def test_an_update_of_a_row_that_is_gone_raises_and_stores_nothing_of_the_statement() -> None:
    thread, gone = ThreadFactory(), MessageFactory()
    Message.objects.filter(pk=gone.pk).delete()
    gone.intent = "x"
    activity = thread_activity_new(thread=thread, kind=ThreadActivity.Kind.FOLLOW_UP)
    with pytest.raises(DatabaseError, match="did not affect any rows"), transaction.atomic():
        write_together(Insert(activity), Update(gone, ["intent"]))
    assert not ThreadActivity.objects.filter(thread=thread).exists()


def test_a_unique_violation_fails_the_whole_statement() -> None:
    message, reply = _a_second_reply()
    with pytest.raises(IntegrityError), transaction.atomic():
        write_together(Update(message, ["status"]), Insert(reply))
    assert _row(Message, message.pk)["status"] == Message.Status.PROCESSING
    assert Message.objects.filter(reply_to=message).count() == 1


def test_one_row_updated_twice_is_refused_before_anything_runs() -> None:
    message = MessageFactory()
    with pytest.raises(ValueError, match="updated twice"):
        write_together(Update(message, ["intent"]), Update(message, ["status"]))
    with pytest.raises(ValueError, match="one model"):
        Insert(ThreadActivity(), Message())


@pytest.mark.django_db(transaction=True)
def test_a_foreign_key_violation_surfaces_at_commit_and_rolls_back_every_write() -> None:
    message = MessageFactory(intent="before")
    message.intent = "after"
    orphan = ThreadActivity(thread_id=uuid.uuid4(), user_id=message.user_id, kind=ThreadActivity.Kind.OPENED)
    with pytest.raises(IntegrityError, match="foreign key"):
        with transaction.atomic():
            write_together(Update(message, ["intent"]), Insert(orphan))
            # Deferred: the statement ran, its rows are visible inside the transaction.
            assert ThreadActivity.objects.filter(pk=orphan.pk).exists()
    assert _row(Message, message.pk)["intent"] == "before"
    assert not ThreadActivity.objects.filter(pk=orphan.pk).exists()


def test_a_model_with_save_receivers_is_written_through_the_orm_and_they_run() -> None:
    seen: list[tuple[str, bool]] = []

    def receiver(sender: type, instance: Message, created: bool = False, **kwargs: object) -> None:
        seen.append((instance.content, created))

    session = ChatSessionFactory()
    thread = ThreadFactory(session=session, user=session.user)
    new = Message(user=session.user, session=session, thread=thread, role="user", content="new")
    old = MessageFactory(thread=thread, content="old")
    old.intent = "kept"
    post_save.connect(receiver, sender=Message)
    try:
        write_together(Insert(new), Update(old, ["intent"]))
    finally:
        post_save.disconnect(receiver, sender=Message)
    assert seen == [("new", True), ("old", False)]
    assert _row(Message, old.pk)["intent"] == "kept" and Message.objects.filter(pk=new.pk).exists()


def _placed(message: Message, thread: Thread | None, event: str) -> Thread:
    return turns.message_place(
        message=message,
        event=event,
        thread=thread,
        confidence=0.9,
        signals={"s": 1},
        intent="CARD",
        intent_confidence=0.8,
        candidates=[],
        embedding=_vector(7),
        now=timezone.now(),
        claim=True,
    )


def test_placement_is_one_statement_with_the_rows_of_each_event() -> None:
    session = ChatSessionFactory()
    first = MessageFactory(thread=None, session=session, user=session.user, status=Message.Status.PENDING)
    with _statements() as seen:
        thread = _placed(first, None, "NEW_TOPIC")
    assert len(seen) == 1
    first.refresh_from_db()
    assert (first.thread_id, first.status, first.intent) == (thread.pk, Message.Status.PROCESSING, "CARD")
    Thread.objects.filter(pk=thread.pk).update(status=Thread.Status.RESOLVED, resolution="fixed")
    thread.refresh_from_db()
    back = MessageFactory(thread=None, session=session, user=session.user, status=Message.Status.PENDING)
    with _statements() as seen:
        _placed(back, thread, "RETURN")
    assert len(seen) == 1
    thread.refresh_from_db()
    assert (thread.status, thread.resolution, thread.topic_weight) == (Thread.Status.OPEN, "", 2)
    assert list(
        ThreadActivity.objects.filter(thread=thread).order_by("pk").values_list("kind", "message_id")
    ) == [
        ("opened", first.pk),
        ("returned", back.pk),
        ("reopened", back.pk),
    ]


def test_a_turn_finished_twice_stores_one_reply_and_the_second_writes_nothing() -> None:
    message = MessageFactory(status=Message.Status.PROCESSING, escalated=False)
    fields = {"content": "Here is how", "escalated": False, "handled_by": "llm"}
    with _statements() as seen:
        reply = turns.turn_finish(message=message, reply_fields=fields, escalation_reason="")
    assert reply is not None and len(seen) == 1
    message.refresh_from_db()
    assert message.status == Message.Status.DONE
    thread_after_first = _row(Thread, message.thread_id)
    assert thread_after_first["last_assistant_text"] == "Here is how"
    # A retried run (a worker died after the commit) comes back with its own reply: nothing changes.
    _assert_a_retried_finish_writes_nothing(message, reply, fields, thread_after_first)


def test_an_escalated_finish_marks_the_thread_and_opens_its_escalation() -> None:
    message = MessageFactory(status=Message.Status.PROCESSING)
    reply = turns.turn_finish(
        message=message,
        reply_fields={"content": "A person will help", "escalated": True, "handled_by": "llm"},
        escalation_reason="asked for a human",
    )
    assert reply is not None
    thread = Thread.objects.get(pk=message.thread_id)
    assert thread.escalated and thread.last_assistant_text == "A person will help"
    assert thread.escalations.filter(message=message).count() == 1
    assert _row(Message, message.pk)["escalated"] is True


# --- in autocommit: the statement is its own transaction (no BEGIN / COMMIT around it) ------------


@contextmanager
def _transactions_opened() -> Iterator[list[bool]]:
    """Each time Django turns autocommit off on the connection (an atomic block's BEGIN)."""
    opened: list[bool] = []
    real = connection.set_autocommit

    def spy(autocommit: bool, *args: object, **kwargs: object) -> None:
        if not autocommit:
            opened.append(True)
        real(autocommit, *args, **kwargs)  # type: ignore[arg-type]

    connection.set_autocommit = spy  # type: ignore[method-assign]
    try:
        yield opened
    finally:
        del connection.set_autocommit


@pytest.mark.django_db(transaction=True)
def test_in_autocommit_the_writes_are_one_statement_and_no_transaction_block() -> None:
    thread = ThreadFactory()
    message = MessageFactory(thread=thread, session=thread.session, user=thread.user, intent="before")
    message.intent = "after"
    activity = thread_activity_new(thread=thread, kind=ThreadActivity.Kind.FOLLOW_UP, message=message)
    with _transactions_opened() as opened, _statements() as seen:
        write_together(Update(message, ["intent"]), Insert(activity))
    assert opened == [] and len(seen) == 1
    assert _row(Message, message.pk)["intent"] == "after"
    assert ThreadActivity.objects.filter(pk=activity.pk).exists()


@pytest.mark.django_db(transaction=True)
def test_in_autocommit_an_update_of_a_row_that_is_gone_raises_and_stores_nothing() -> None:
    thread, gone = ThreadFactory(), MessageFactory()
    Message.objects.filter(pk=gone.pk).delete()
    gone.intent = "x"
    activity = thread_activity_new(thread=thread, kind=ThreadActivity.Kind.FOLLOW_UP)
    for _ in range(2):  # the second reuses the compiled (guarded) statement
        with pytest.raises(DatabaseError, match="did not affect any rows") as raised:
            write_together(Insert(activity), Update(gone, ["intent"]))
        assert type(raised.value) is DatabaseError
        activity.pk, activity._state.adding = None, True
    assert not ThreadActivity.objects.filter(thread=thread).exists()
    # The connection is usable at once (autocommit: nothing to roll back).
    assert Thread.objects.filter(pk=thread.pk).exists()


@pytest.mark.django_db(transaction=True)
def test_in_autocommit_a_unique_violation_fails_the_whole_statement() -> None:
    message, reply = _a_second_reply()
    with pytest.raises(IntegrityError):
        write_together(Update(message, ["status"]), Insert(reply))
    assert _row(Message, message.pk)["status"] == Message.Status.PROCESSING
    assert Message.objects.filter(reply_to=message).count() == 1


@pytest.mark.django_db(transaction=True)
def test_a_turn_finished_in_autocommit_signals_once_and_twice_stores_one_reply() -> None:
    from conversations.turn_results import _redis, result_key

    message = MessageFactory(status=Message.Status.PROCESSING, escalated=False)
    key = result_key(message.pk)
    _redis().delete(key)
    fields = {"content": "Here is how", "escalated": False, "handled_by": "llm"}
    with _transactions_opened() as opened, _statements() as seen:
        reply = turns.turn_finish(message=message, reply_fields=fields, escalation_reason="")
    assert reply is not None and len(seen) == 1 and opened == []
    assert _redis().lrange(key, 0, -1) == [b"done"]  # the signal went out after the statement
    thread_after_first = _row(Thread, message.thread_id)
    _assert_a_retried_finish_writes_nothing(message, reply, fields, thread_after_first)
    assert _redis().lrange(key, 0, -1) == [b"done"]  # the failed second run signalled nothing
    _redis().delete(key)


@pytest.mark.django_db(transaction=True)
def test_an_escalated_finish_in_autocommit_still_opens_its_escalation_in_the_same_transaction() -> None:
    message = MessageFactory(status=Message.Status.PROCESSING)
    with _transactions_opened() as opened:
        reply = turns.turn_finish(
            message=message,
            reply_fields={"content": "A person will help", "escalated": True, "handled_by": "llm"},
            escalation_reason="asked for a human",
        )
    assert reply is not None and opened == [True]
    thread = Thread.objects.get(pk=message.thread_id)
    assert thread.escalated and thread.escalations.filter(message=message).count() == 1


# --- counts: a turn's memories counted in its finish's statement ----------------------------------


def _memories(message: Message, n: int) -> list[Memory]:
    user = message.user
    return [
        Memory.objects.create(
            agent_id=user.agent_id,
            user=user,
            kind=Memory.Kind.FACT,
            content=f"fact {i}",
            embedding=_vector(i),
            embedding_model="test",
        )
        for i in range(n)
    ]


def _counts(memories: list[Memory]) -> list[tuple[int, object]]:
    rows = dict(Memory.objects.filter(pk__in=[m.pk for m in memories]).values_list("pk", "use_count"))
    used = dict(Memory.objects.filter(pk__in=[m.pk for m in memories]).values_list("pk", "last_used_at"))
    return [(rows[m.pk], used[m.pk]) for m in memories]


@pytest.mark.django_db(transaction=True)
def test_a_finish_in_autocommit_counts_its_memories_in_its_one_statement_and_a_retried_one_does_not() -> None:
    message = MessageFactory(status=Message.Status.PROCESSING, escalated=False)
    used, unused = _memories(message, 2), _memories(message, 1)
    gone = str(uuid.uuid4())  # deleted since the turn read it: skipped, not an error
    now = timezone.now()
    fields = {"content": "Here is how", "escalated": False, "handled_by": "llm"}
    also = memories_use_writes(memory_ids=[str(m.pk) for m in used] + [gone], now=now)

    with _transactions_opened() as opened, _statements() as seen:
        reply = turns.turn_finish(message=message, reply_fields=fields, escalation_reason="", also=also)

    assert reply is not None and len(seen) == 1 and opened == []
    assert _counts(used) == [(1, now), (1, now)]
    assert _counts(unused) == [(0, None)]
    # A retried run of the turn stores no second reply, and counts no second use.
    retried = Message.objects.select_related("thread").get(pk=message.pk)
    retried.status = Message.Status.PROCESSING
    later = memories_use_writes(memory_ids=[str(m.pk) for m in used], now=timezone.now())
    assert turns.turn_finish(message=retried, reply_fields=fields, escalation_reason="", also=later) is None
    assert _counts(used) == [(1, now), (1, now)]


def test_an_escalated_finish_counts_its_memories_in_its_transaction() -> None:
    message = MessageFactory(status=Message.Status.PROCESSING)
    used = _memories(message, 1)
    now = timezone.now()
    reply = turns.turn_finish(
        message=message,
        reply_fields={"content": "A person will help", "escalated": True, "handled_by": "llm"},
        escalation_reason="asked for a human",
        also=memories_use_writes(memory_ids=[str(used[0].pk)], now=now),
    )
    assert reply is not None and _counts(used) == [(1, now)]
    assert memories_use_writes(memory_ids=[], now=now) == []


def test_an_increment_beside_a_model_with_save_receivers_goes_through_the_orm_too() -> None:
    def receiver(**kwargs: object) -> None:
        pass

    message = MessageFactory(intent="before")
    used = _memories(message, 1)
    message.intent = "after"
    now = timezone.now()
    post_save.connect(receiver, sender=Message)
    try:
        write_together(
            Update(message, ["intent"]), *memories_use_writes(memory_ids=[str(used[0].pk)], now=now)
        )
    finally:
        post_save.disconnect(receiver, sender=Message)
    assert _row(Message, message.pk)["intent"] == "after"
    assert _counts(used) == [(1, now)]


def test_an_increment_needs_keys_and_fields_of_its_model() -> None:
    with pytest.raises(ValueError, match="at least one key"):
        Increment(Memory, [], field="use_count")
    message = MessageFactory()
    with pytest.raises(ValueError, match="fields of Memory's own"):
        write_together(Update(message, ["intent"]), Increment(Memory, [uuid.uuid4()], field="no_such_count"))
    assert _row(Message, message.pk)["intent"] == message.intent  # nothing ran
