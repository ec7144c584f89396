"""Queries compiled once per connection (agentflow.prepared): the same rows as the ORM, every run."""

from __future__ import annotations

from datetime import timedelta

import numpy as np
import pytest
from django.db import DatabaseError, IntegrityError, connections, transaction
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.models.signals import post_save
from django.db.transaction import TransactionManagementError
from django.utils import timezone
from pgvector.django import CosineDistance

from agentflow.prepared import PreparedQuery, create, save_fields
from agentflow.vectors import CosineDistance as FastCosineDistance
from conversations.models import EMBEDDING_DIMENSIONS, ChatSession, EndUser, Message, Thread, ThreadActivity
from tests.conversations.factories import ChatSessionFactory, MessageFactory, ThreadFactory

pytestmark = pytest.mark.django_db


def _messages(*, user_id: int, since: object, limit: int) -> QuerySet[Message]:
    replies = Message.objects.filter(reply_to=OuterRef("pk")).order_by().values("reply_to")
    return (
        Message.objects.select_related("user", "session")
        .filter(user_id=user_id, created_at__gte=since)
        .annotate(replies=Subquery(replies.annotate(n=Count("id")).values("n")[:1]))
        .order_by("created_at")[:limit]
    )


def test_each_run_returns_what_the_orm_returns_for_its_own_values() -> None:
    first, second = MessageFactory(content="one"), MessageFactory(content="two")
    MessageFactory(user=first.user, session=first.session, thread=first.thread, content="three")
    query = PreparedQuery(_messages)
    long_ago = timezone.now() - timedelta(days=1)

    for message in (first, second, first):  # the second run on this connection reuses the compiled SQL
        rows = query.run(shape={"limit": 5}, user_id=message.user_id, since=long_ago)
        expected = list(_messages(user_id=message.user_id, since=long_ago, limit=5))
        assert [(m.pk, m.content, m.user.external_id, m.session_id, m.replies) for m in rows] == [
            (m.pk, m.content, m.user.external_id, m.session_id, m.replies) for m in expected
        ]
    assert [m.content for m in query.run(shape={"limit": 1}, user_id=first.user_id, since=long_ago)] == [
        "one"
    ]
    assert (
        query.run(shape={"limit": 5}, user_id=first.user_id, since=timezone.now() + timedelta(days=1)) == []
    )


def test_values_rows_come_back_as_dicts() -> None:
    session = ChatSessionFactory()
    query = PreparedQuery(
        lambda *, session_id: ChatSession.objects.filter(pk=session_id).values("id", "ttl_seconds")
    )

    assert query.run(session_id=session.pk) == [{"id": session.pk, "ttl_seconds": session.ttl_seconds}]


def test_a_value_the_orm_rewrites_falls_back_to_the_orm_with_the_same_rows() -> None:
    MessageFactory(content="hello world")
    MessageFactory(content="goodbye")
    # startswith sends "hel%" as the parameter: the stand-in cannot be found, so the ORM runs each time.
    query = PreparedQuery(lambda *, prefix: Message.objects.filter(content__startswith=prefix))

    assert [m.content for m in query.run(prefix="hel")] == ["hello world"]
    assert [m.content for m in query.run(prefix="good")] == ["goodbye"]


def test_parameters_that_change_the_sql_are_refused() -> None:
    query = PreparedQuery(lambda *, ids: Message.objects.filter(pk__in=ids))

    with pytest.raises(TypeError, match="no stand-in for a parameter of type list"):
        query.run(ids=[1, 2])
    flag = PreparedQuery(lambda *, escalated: Message.objects.filter(escalated=escalated))
    with pytest.raises(TypeError, match="a bool changes the SQL's shape"):
        flag.run(escalated=True)


@pytest.mark.django_db(transaction=True)
def test_a_locking_query_outside_a_transaction_is_refused_every_time() -> None:
    message = MessageFactory()
    query = PreparedQuery(lambda *, pk: Message.objects.select_for_update().filter(pk=pk))

    with transaction.atomic():
        assert [m.pk for m in query.run(pk=message.pk)] == [message.pk]
    with pytest.raises(TransactionManagementError):
        query.run(pk=message.pk)


# --- writes: create() and save_fields() ----------------------------------------------------------


def _row(model: type, pk: object) -> dict[str, object]:
    return model.objects.filter(pk=pk).values().get()  # type: ignore[attr-defined, no-any-return]


def test_create_stores_the_row_the_orm_stores_each_time() -> None:
    session = ChatSessionFactory()
    for content in ("first", "second"):  # the second reuses the compiled INSERT
        fields = {
            "user": session.user,
            "session": session,
            "role": Message.Role.USER,
            "content": content,
            "status": Message.Status.PENDING,
            "thread_signals": {"a": [1, 2]},
            "model": "m-1",  # a field of Message named like create()'s first argument
        }
        ours, theirs = create(Message, **fields), Message.objects.create(**fields)
        assert not ours._state.adding and ours._state.db == "default"
        mine, orm = _row(Message, ours.pk), _row(Message, theirs.pk)
        assert mine.pop("id") == ours.pk and orm.pop("id") == theirs.pk
        assert mine.pop("created_at") == ours.created_at
        orm.pop("created_at")
        assert mine == orm


def test_create_returns_the_database_generated_key() -> None:
    thread = ThreadFactory()
    first = create(ThreadActivity, thread=thread, user_id=thread.user_id, kind=ThreadActivity.Kind.OPENED)
    second = create(ThreadActivity, thread=thread, user_id=thread.user_id, kind=ThreadActivity.Kind.FOLLOW_UP)
    assert isinstance(first.pk, int) and second.pk > first.pk
    assert _row(ThreadActivity, second.pk)["kind"] == "follow_up"


def test_create_refuses_an_unsaved_related_object_and_stores_nothing() -> None:
    session = ChatSessionFactory()
    unsaved = EndUser(agent=session.user.agent, external_id="not-saved")
    before = Message.objects.count()
    with pytest.raises(ValueError, match="unsaved related object"):
        create(Message, user=unsaved, session=session, role="user", content="x")
    assert Message.objects.count() == before


def test_create_keeps_a_constraint_violation_an_integrity_error() -> None:
    session = ChatSessionFactory()
    fields = {"user": session.user, "session": session, "role": "user", "content": "x"}
    create(Message, client_message_id="c-1", **fields)
    with pytest.raises(IntegrityError), transaction.atomic():
        create(Message, client_message_id="c-1", **fields)
    assert Message.objects.filter(client_message_id="c-1").count() == 1


def test_save_fields_writes_only_those_fields() -> None:
    message = MessageFactory(content="kept", intent="")
    other = Message.objects.get(pk=message.pk)
    other.content = "changed elsewhere"
    other.save(update_fields=["content"])
    for intent in ("billing", "refund"):  # the second reuses the compiled UPDATE
        message.intent, message.thread_signals, message.content = intent, {"s": intent}, "not saved"
        save_fields(message, ["intent", "thread_signals"])
        row = _row(Message, message.pk)
        assert (row["intent"], row["thread_signals"], row["content"]) == (
            intent,
            {"s": intent},
            "changed elsewhere",
        )


def test_save_fields_of_a_deleted_row_raises_like_the_orm() -> None:
    message = MessageFactory()
    Message.objects.filter(pk=message.pk).delete()
    message.intent = "billing"
    with pytest.raises(DatabaseError, match="did not affect any rows"):
        save_fields(message, ["intent"])
    with pytest.raises(ValueError, match="do not exist"):
        save_fields(message, ["no_such_field"])


def test_a_model_with_save_receivers_takes_the_orm_path_and_they_run() -> None:
    seen: list[tuple[str, bool]] = []

    def receiver(sender: type, instance: Message, created: bool = False, **kwargs: object) -> None:
        seen.append((instance.content, created))

    session = ChatSessionFactory()
    post_save.connect(receiver, sender=Message)
    try:
        message = create(Message, user=session.user, session=session, role="user", content="hello")
        message.intent = "x"
        save_fields(message, ["intent"])
    finally:
        post_save.disconnect(receiver, sender=Message)
    assert seen == [("hello", True), ("hello", False)]


def _nearest_threads(*, user_id: int, embedding: object) -> QuerySet[Thread]:
    return (
        Thread.objects.filter(user_id=user_id)
        .annotate(
            d_topic=CosineDistance("topic_embedding", embedding),
            d_last=CosineDistance("last_user_embedding", embedding),
        )
        .order_by("d_topic")
    )


def test_vectors_read_and_passed_twice_in_one_query_match_the_orm_every_run() -> None:
    rng = np.random.default_rng(7)
    vectors = [rng.random(EMBEDDING_DIMENSIONS, dtype=np.float32) for _ in range(3)]
    first, second = ThreadFactory(topic_embedding=vectors[0]), ThreadFactory(topic_embedding=vectors[1])
    ThreadFactory(user=first.user, session=first.session, topic_embedding=vectors[2])
    query = PreparedQuery(_nearest_threads)
    for thread, probe in ((first, vectors[1]), (second, vectors[2]), (first, vectors[0])):
        rows = query.run(user_id=thread.user_id, embedding=probe)
        expected = list(_nearest_threads(user_id=thread.user_id, embedding=probe))
        assert [(t.pk, t.topic_embedding, t.d_topic, t.d_last) for t in rows] == [
            (t.pk, t.topic_embedding, t.d_topic, t.d_last) for t in expected
        ]
        assert isinstance(rows[0].topic_embedding, list) and rows[0].d_topic == pytest.approx(
            1
            - float(np.dot(probe, rows[0].topic_embedding))
            / float(np.linalg.norm(probe) * np.linalg.norm(rows[0].topic_embedding)),
            abs=1e-5,
        )


@pytest.mark.parametrize("distance", [CosineDistance, FastCosineDistance])
def test_a_vector_in_either_text_form_is_a_parameter_not_a_fallback_to_the_orm(distance: type) -> None:
    def nearest(*, user_id: int, embedding: object) -> QuerySet[Thread]:
        return Thread.objects.filter(user_id=user_id).annotate(d=distance("topic_embedding", embedding))

    rng = np.random.default_rng(8)
    thread = ThreadFactory(topic_embedding=rng.random(EMBEDDING_DIMENSIONS, dtype=np.float32))
    query = PreparedQuery(nearest)
    for _ in range(2):
        probe = rng.random(EMBEDDING_DIMENSIONS, dtype=np.float32)
        [row] = query.run(user_id=thread.user_id, embedding=probe)
        [expected] = nearest(user_id=thread.user_id, embedding=probe)
        assert row.d == expected.d
    [compiled] = query._by_connection[connections["default"]].values()
    assert compiled.usable


def _thread_of(*rest: tuple[str, str, str]) -> tuple[Thread, list[Message]]:
    """A thread whose first message is the user's "one", then ``rest`` as (content, role, status),
    stored one second apart in that order; returns the thread and the messages after the first."""
    first = MessageFactory(content="one", role=Message.Role.USER, status=Message.Status.DONE)
    later = [
        MessageFactory(
            user=first.user,
            session=first.session,
            thread=first.thread,
            content=text,
            role=role,
            status=status,
        )
        for text, role, status in rest
    ]
    step = timedelta(seconds=1)
    for i, message in enumerate([first, *later]):
        Message.objects.filter(pk=message.pk).update(created_at=timezone.now() - step * (10 - i))
    return first.thread, later


def test_thread_history_is_role_and_content_rows_oldest_first_every_run() -> None:
    from conversations.selectors import _THREAD_HISTORY, thread_history

    thread, later = _thread_of(
        ("two", Message.Role.ASSISTANT, Message.Status.DONE),
        ("three", Message.Role.USER, Message.Status.PENDING),  # not finished: left out
        ("four", Message.Role.USER, Message.Status.DONE),
    )

    for _ in range(2):  # the second run reuses the compiled SQL
        rows = thread_history(thread=thread, limit=5)
        assert [(r.role, r.content) for r in rows] == [
            ("user", "one"),
            ("assistant", "two"),
            ("user", "four"),
        ]
    before = Message.objects.get(pk=later[2].pk)
    assert [r.content for r in thread_history(thread=thread, limit=1, before=before)] == ["two"]
    assert all(c.usable for c in _THREAD_HISTORY._by_connection[connections["default"]].values())


def test_thread_earlier_than_window_is_the_older_finished_rows_oldest_first_every_run() -> None:
    from conversations.selectors import _THREAD_EARLIER, thread_earlier_than_window

    thread, rest = _thread_of(
        ("two", Message.Role.ASSISTANT, Message.Status.DONE),
        ("three", Message.Role.USER, Message.Status.PENDING),  # not finished: left out
        ("four", Message.Role.USER, Message.Status.DONE),
        ("five", Message.Role.ASSISTANT, Message.Status.DONE),
        ("six", Message.Role.USER, Message.Status.PROCESSING),  # the turn's own message
    )
    current = Message.objects.get(pk=rest[-1].pk)

    for _ in range(2):  # the second run reuses the compiled SQL
        rows = thread_earlier_than_window(thread=thread, window=1, before=current)
        assert [(r.role, r.content) for r in rows] == [
            ("user", "one"),
            ("assistant", "two"),
            ("user", "four"),
        ]
    # The ORM's own answer (model instances) for the same window and limit.
    orm = (
        Message.objects.filter(thread=thread, created_at__lt=current.created_at)
        .exclude(status=Message.Status.PENDING)
        .order_by("-created_at")[2:4]
    )
    rows = thread_earlier_than_window(thread=thread, window=2, before=current, limit=2)
    assert [r.content for r in rows] == [m.content for m in reversed(orm)] == ["one", "two"]
    assert all(c.usable for c in _THREAD_EARLIER._by_connection[connections["default"]].values())


@pytest.mark.django_db(transaction=True)
def test_another_threads_connection_reuses_the_compile_and_gets_the_orms_rows() -> None:
    """A Celery worker runs each turn's database steps on one thread per worker thread: each has a
    connection of its own, and the queryset is built and compiled once for all of them."""
    import threading

    first, second = MessageFactory(content="one"), MessageFactory(content="two")
    long_ago = timezone.now() - timedelta(days=1)
    builds: list[dict[str, object]] = []

    def build(**kwargs: object) -> QuerySet[Message]:
        builds.append(kwargs)
        return _messages(**kwargs)  # type: ignore[arg-type]

    query = PreparedQuery(build)

    def seen(message: Message) -> list[tuple[object, ...]]:
        rows = query.run(shape={"limit": 5}, user_id=message.user_id, since=long_ago)
        return [(m.pk, m.content, m.user.external_id, m.session_id, m.replies) for m in rows]

    here = seen(first)
    there: list[object] = []

    def in_thread() -> None:
        try:
            there.extend([seen(second), seen(first)])
        finally:
            connections.close_all()

    worker = threading.Thread(target=in_thread)
    worker.start()
    worker.join(30)

    def orm(message: Message) -> list[tuple[object, ...]]:
        rows = _messages(user_id=message.user_id, since=long_ago, limit=5)
        return [(m.pk, m.content, m.user.external_id, m.session_id, m.replies) for m in rows]

    assert here == orm(first) and there == [orm(second), orm(first)]
    assert len(builds) == 1  # compiled once, in the first thread; the other thread only bound it
