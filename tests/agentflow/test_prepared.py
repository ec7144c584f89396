"""Queries compiled once per connection (agentflow.prepared): the same rows as the ORM, every run."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import transaction
from django.db.models import Count, OuterRef, QuerySet, Subquery
from django.db.transaction import TransactionManagementError
from django.utils import timezone

from agentflow.prepared import PreparedQuery
from conversations.models import ChatSession, Message
from tests.conversations.factories import ChatSessionFactory, MessageFactory

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
