"""Thread activities and the staff's thread actions: resolve, reopen, merge, split (services and admin)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import numpy as np
import pytest
from asgiref.sync import async_to_sync
from django.urls import reverse
from django.utils import timezone

from agentflow import AgentFrameworkBuilder
from agentflow.embeddings import get_embedder
from agentflow.errors import InvalidInput
from conversations.models import Message, Thread, ThreadActivity
from conversations.services import (
    thread_activity_record,
    thread_add_message,
    thread_split,
    thread_staff_reopen,
    thread_staff_resolve,
    threads_mark_dormant,
    threads_merge,
)

from .factories import ChatSessionFactory, EndUserFactory, MessageFactory, ThreadFactory

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff(django_user_model):
    return django_user_model.objects.create_superuser("ops", "ops@example.com", "ops-password-123")


@pytest.fixture
def staff_client(client, staff):
    client.force_login(staff)
    return client


def _thread(user: Any = None, *, text: str, weight: int = 1, **fields: Any) -> Thread:
    session = ChatSessionFactory(user=user) if user is not None else ChatSessionFactory()
    vector = get_embedder().embed_one(text)
    return ThreadFactory(
        session=session,
        topic=text,
        topic_embedding=vector,
        opening_embedding=vector,
        last_user_embedding=vector,
        topic_weight=weight,
        vocabulary=sorted(set(text.lower().split())),
        **fields,
    )


def _conversation(thread: Thread, *texts: str) -> list[Message]:
    """Alternating user and assistant messages in the thread, in order."""
    return [
        MessageFactory(
            thread=thread, content=text, role=Message.Role.USER if i % 2 == 0 else Message.Role.ASSISTANT
        )
        for i, text in enumerate(texts)
    ]


def _snapshot() -> dict[str, Any]:
    """Every thread, message placement and activity: compared before and after a refused change."""
    return {
        "threads": list(
            Thread.objects.order_by("pk").values_list(
                "pk", "status", "topic_weight", "resolution", "vocabulary"
            )
        ),
        "messages": list(Message.objects.order_by("pk").values_list("pk", "thread_id")),
        "activities": ThreadActivity.objects.count(),
    }


def _activities(thread: Thread) -> list[tuple[str, str]]:
    return list(
        ThreadActivity.objects.filter(thread=thread).order_by("created_at").values_list("kind", "actor")
    )


# --- services ----------------------------------------------------------------------------------


def test_activity_record_defaults_to_the_system_and_the_thread_user() -> None:
    thread = _thread(text="My login is broken")

    activity = thread_activity_record(thread=thread, kind=ThreadActivity.Kind.DORMANT)

    assert (activity.user_id, activity.kind, activity.actor) == (thread.user_id, "dormant", "system")
    assert (activity.message, activity.staff_user, activity.detail) == (None, None, {})
    assert activity.created_at is not None


def test_staff_resolve_then_reopen(staff) -> None:
    thread = _thread(text="My login is broken")
    before = thread.last_activity_at

    thread_staff_resolve(thread=thread, staff_user=staff, note="Password reset by phone")
    thread_staff_resolve(thread=thread, staff_user=staff)  # already resolved: nothing happens
    thread.refresh_from_db()
    assert (thread.status, thread.resolution, thread.last_activity_at) == (
        "resolved",
        "Password reset by phone",
        before,
    )
    assert thread.resolved_at is not None

    thread_staff_reopen(thread=thread, staff_user=staff)
    thread_staff_reopen(thread=thread, staff_user=staff)  # already open: nothing happens
    thread.refresh_from_db()
    assert (thread.status, thread.resolved_at, thread.resolution) == ("open", None, "")

    activities = list(ThreadActivity.objects.filter(thread=thread).order_by("created_at"))
    assert [(a.kind, a.actor, a.staff_user_id, a.detail) for a in activities] == [
        ("resolved", "staff", staff.pk, {"note": "Password reset by phone"}),
        ("reopened", "staff", staff.pk, {"from": "resolved"}),
    ]


def test_merge_moves_messages_and_folds_the_topic(staff) -> None:
    user = EndUserFactory(external_id="alice")
    source = _thread(user, text="login broken", weight=1)
    target = _thread(user, text="password wrong", weight=3)
    source_messages = _conversation(source, "My login is broken", "Try resetting it")
    target_messages = _conversation(target, "My password is wrong")
    expected = (np.asarray(source.topic_embedding) * 1 + np.asarray(target.topic_embedding) * 3) / 4

    merged = threads_merge(source=source, target=target, staff_user=staff)

    assert merged.pk == target.pk
    assert set(Message.objects.filter(thread=target).values_list("pk", flat=True)) == {
        m.pk for m in source_messages + target_messages
    }
    target.refresh_from_db()
    source.refresh_from_db()
    assert target.topic_weight == 4
    np.testing.assert_allclose(np.asarray(target.topic_embedding), expected, rtol=1e-5, atol=1e-6)
    assert target.vocabulary == ["password", "wrong", "broken", "login"]
    assert target.status == "open"
    assert (source.status, source.resolution) == ("resolved", f"merged into {target.pk}")
    assert (source.topic_embedding, source.topic_weight) == (None, 0)
    assert source.messages.count() == 0
    detail = {"source": str(source.pk), "target": str(target.pk), "messages": 2}
    for thread in (source, target):
        activity = ThreadActivity.objects.get(thread=thread)
        assert (activity.kind, activity.actor, activity.staff_user_id, activity.detail) == (
            "merged",
            "staff",
            staff.pk,
            detail,
        )


def test_merge_of_two_users_threads_is_refused_and_changes_nothing(staff) -> None:
    alice = _thread(EndUserFactory(external_id="alice"), text="login broken")
    bob = _thread(EndUserFactory(external_id="bob"), text="password wrong")
    _conversation(alice, "My login is broken")
    _conversation(bob, "My password is wrong")
    before = _snapshot()

    with pytest.raises(InvalidInput) as error:
        threads_merge(source=alice, target=bob, staff_user=staff)

    assert error.value.field == "thread"
    assert _snapshot() == before


def test_merge_into_itself_is_refused(staff) -> None:
    thread = _thread(text="login broken")
    _conversation(thread, "My login is broken")
    before = _snapshot()

    with pytest.raises(InvalidInput):
        threads_merge(source=thread, target=thread, staff_user=staff)

    assert _snapshot() == before


def test_split_moves_the_message_and_everything_after_it(staff) -> None:
    thread = _thread(text="My login is broken")
    first, reply, switch, switch_reply = _conversation(
        thread, "My login is broken", "Try resetting it", "Also my invoice is missing", "Let me check billing"
    )

    new = thread_split(message=switch, staff_user=staff)

    assert set(Message.objects.filter(thread=thread).values_list("pk", flat=True)) == {first.pk, reply.pk}
    assert set(Message.objects.filter(thread=new).values_list("pk", flat=True)) == {
        switch.pk,
        switch_reply.pk,
    }
    vector = get_embedder().embed_one("Also my invoice is missing")
    assert (new.user_id, new.session_id, new.status, new.topic, new.topic_weight) == (
        thread.user_id,
        switch.session_id,
        "open",
        "Also my invoice is missing",
        1,
    )
    for field in ("topic_embedding", "opening_embedding", "last_user_embedding"):
        np.testing.assert_allclose(np.asarray(getattr(new, field)), vector, rtol=1e-5, atol=1e-6)
    assert set(new.vocabulary) == {"invoice", "missing", "let", "check", "billing"}
    assert new.last_assistant_text == "Let me check billing"
    thread.refresh_from_db()
    assert thread.last_activity_at == reply.created_at
    detail = {"from": str(thread.pk), "to": str(new.pk), "messages": 2}
    for t in (thread, new):
        activity = ThreadActivity.objects.get(thread=t)
        assert (
            activity.kind,
            activity.actor,
            activity.message_id,
            activity.staff_user_id,
            activity.detail,
        ) == (
            "split",
            "staff",
            switch.pk,
            staff.pk,
            detail,
        )


def test_split_at_the_first_message_or_a_reply_is_refused(staff) -> None:
    thread = _thread(text="My login is broken")
    first, reply = _conversation(thread, "My login is broken", "Try resetting it")
    before = _snapshot()

    with pytest.raises(InvalidInput):
        thread_split(message=first, staff_user=staff)
    with pytest.raises(InvalidInput):
        thread_split(message=reply, staff_user=staff)

    assert _snapshot() == before


# --- the turn pipeline -------------------------------------------------------------------------


@pytest.mark.parametrize("status", ["resolved", "dormant"])
def test_a_new_message_reopens_the_thread_and_clears_its_old_resolution(status: str) -> None:
    thread = _thread(text="My login is broken", status=status, resolved_at=timezone.now(), resolution="Fixed")
    vector = get_embedder().embed_one("It is broken again")

    thread_add_message(thread=thread, text="It is broken again", embedding=vector, now=timezone.now())

    thread.refresh_from_db()
    assert (thread.status, thread.resolved_at, thread.resolution, thread.topic_weight) == (
        "open",
        None,
        "",
        2,
    )


def test_turns_record_their_activities() -> None:
    agent = AgentFrameworkBuilder().with_intent_categories([]).build_sync(None)
    send = async_to_sync(agent.process_message)

    turns = [
        send(user_id="alice", message=text)
        for text in (
            "My login is broken",
            "It says invalid password when I try",
            "Thanks, that fixed the login!",
        )
    ]

    assert [t["thread_event"] for t in turns] == ["NEW_TOPIC", "FOLLOW_UP", "RESOLUTION"]
    activities = ThreadActivity.objects.order_by("created_at")
    assert [
        (str(a.thread_id), a.kind, a.actor, str(a.message_id), a.user.external_id) for a in activities
    ] == [
        (t["thread_id"], kind, "user", t["message_id"], "alice")
        for t, kind in zip(turns, ["opened", "follow_up", "resolved"], strict=True)
    ]


# --- the admin ---------------------------------------------------------------------------------


def _action(client: Any, model: str, action: str, objects: list[Any]):
    return client.post(
        reverse(f"admin:conversations_{model}_changelist"),
        {"action": action, "_selected_action": [str(o.pk) for o in objects]},
        follow=True,
    )


def _shown(response: Any) -> list[tuple[str, str]]:
    return [(m.level_tag, str(m)) for m in response.context["messages"]]


def test_admin_resolves_and_reopens(staff_client, staff) -> None:
    threads = [_thread(text="login broken"), _thread(text="invoice missing")]

    resolved = _action(staff_client, "thread", "resolve_threads", threads)
    assert _shown(resolved) == [("success", "Resolved 2 thread(s).")]
    assert set(Thread.objects.values_list("status", flat=True)) == {"resolved"}

    reopened = _action(staff_client, "thread", "reopen_threads", threads[:1])
    assert _shown(reopened) == [("success", "Reopened 1 thread(s).")]
    assert Thread.objects.get(pk=threads[0].pk).status == "open"
    assert _activities(threads[0]) == [("resolved", "staff"), ("reopened", "staff")]
    assert set(ThreadActivity.objects.values_list("staff_user", flat=True)) == {staff.pk}


def test_admin_merges_into_the_most_recent_thread(staff_client) -> None:
    user = EndUserFactory(external_id="alice")
    older = _thread(user, text="login broken")
    newer = _thread(user, text="password wrong")
    messages = _conversation(older, "My login is broken") + _conversation(newer, "My password is wrong")

    response = _action(staff_client, "thread", "merge_threads", [older, newer])

    assert _shown(response) == [("success", "Merged 1 thread(s) into \u201cpassword wrong\u201d.")]
    assert set(Message.objects.filter(thread=newer).values_list("pk", flat=True)) == {m.pk for m in messages}
    assert Thread.objects.get(pk=older.pk).resolution == f"merged into {newer.pk}"


@pytest.mark.parametrize("selection", ["one thread", "two users"])
def test_admin_merge_with_a_wrong_selection_changes_nothing(staff_client, selection) -> None:
    alice = EndUserFactory(external_id="alice")
    threads = [_thread(alice, text="login broken")]
    if selection == "two users":
        threads.append(_thread(EndUserFactory(external_id="bob"), text="password wrong"))
    for thread in threads:
        _conversation(thread, f"About {thread.topic}")
    before = _snapshot()

    response = _action(staff_client, "thread", "merge_threads", threads)

    assert _shown(response) == [("error", "Select two or more threads of one user to merge.")]
    assert _snapshot() == before


def test_admin_splits_at_a_message(staff_client) -> None:
    thread = _thread(text="My login is broken")
    _, _, switch = _conversation(
        thread, "My login is broken", "Try resetting it", "Also my invoice is missing"
    )

    response = _action(staff_client, "message", "split_thread", [switch])

    new = Thread.objects.exclude(pk=thread.pk).get()
    assert _shown(response) == [
        ("success", "Split into the new thread \u201cAlso my invoice is missing\u201d.")
    ]
    assert list(new.messages.values_list("pk", flat=True)) == [switch.pk]


@pytest.mark.parametrize("selection", ["two messages", "a reply", "the first message"])
def test_admin_split_with_a_wrong_selection_changes_nothing(staff_client, selection) -> None:
    thread = _thread(text="My login is broken")
    first, reply, switch = _conversation(
        thread, "My login is broken", "Try resetting it", "Also my invoice is missing"
    )
    chosen = {"two messages": [first, switch], "a reply": [reply], "the first message": [first]}[selection]
    before = _snapshot()

    response = _action(staff_client, "message", "split_thread", chosen)

    expected = {
        "two messages": "Select exactly one user message to split at.",
        "a reply": "Select exactly one user message to split at.",
        "the first message": "splitting at a thread's first message would leave it empty",
    }[selection]
    assert _shown(response) == [("error", expected)]
    assert _snapshot() == before


def test_thread_page_shows_the_activity_timeline_and_activities_are_listed(staff_client, staff) -> None:
    thread = _thread(EndUserFactory(external_id="alice"), text="login broken")
    thread_staff_resolve(thread=thread, staff_user=staff)

    page = staff_client.get(reverse("admin:conversations_thread_change", args=[thread.pk]))
    listed = staff_client.get(
        reverse("admin:conversations_threadactivity_changelist"),
        {"q": "alice", "kind": "resolved", "actor": "staff"},
    )

    assert page.status_code == 200
    assert [a.kind for a in page.context["inline_admin_formsets"][0].formset.queryset] == ["resolved"]
    assert [a.thread_id for a in listed.context["cl"].result_list] == [thread.pk]


def test_marking_idle_threads_dormant_records_it() -> None:
    user = EndUserFactory(external_id="alice")
    idle = _thread(user, text="login broken", last_activity_at=timezone.now() - timedelta(hours=2))
    busy = _thread(user, text="invoice missing")

    marked = threads_mark_dormant(user=user, idle=timedelta(minutes=30), now=timezone.now())

    assert marked == 1
    assert Thread.objects.get(pk=idle.pk).status == "dormant"
    assert Thread.objects.get(pk=busy.pk).status == "open"
    assert _activities(idle) == [("dormant", "system")]
    assert _activities(busy) == []
