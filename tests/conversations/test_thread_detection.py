"""Thread detection: the pure decision on real embeddings, then through ``Agent.process_message``."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from asgiref.sync import sync_to_async
from django.db import connections
from django.db.models import F
from django.utils import timezone

from agentflow import AgentFrameworkBuilder, IntentCategory, pipeline
from agentflow.embeddings import get_embedder
from conversations import selectors
from conversations.models import ChatSession, EndUser, Message, Thread, ThreadActivity
from conversations.thread_detection import Candidate, decide_thread
from conversations.thread_features import ThreadState, content_words, load_model

CATEGORIES = [
    IntentCategory(
        "LOGIN",
        "Signing in, passwords and account access",
        ["I can't log in", "My password doesn't work", "Sign-in fails"],
    ),
    IntentCategory(
        "STORAGE",
        "S3 buckets and file storage",
        ["How do I create an S3 bucket?", "Uploading a file to S3 fails"],
    ),
    IntentCategory(
        "BILLING", "Invoices, charges and payments", ["I was charged twice", "Where is my invoice?"]
    ),
]

LOGIN = "My login is broken"
LOGIN_DETAIL = "It says invalid password when I try"
S3_SWITCH = "Actually, different question about S3"
LOGIN_THANKS = "Thanks, that fixed the login!"
BILLING = "I was charged twice on my invoice"
LOGIN_RETURN = "Back to my login problem, it still fails"

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
INACTIVITY = timedelta(minutes=30)


def _embed(text: str) -> np.ndarray:
    return get_embedder().embed_one(text)


def _candidate(name: str, text: str, idle_minutes: float = 1, *, current_session: bool = True) -> Candidate:
    vector = _embed(text)
    state = ThreadState(vector, vector, vector.copy(), content_words(text))
    return Candidate(name, state, NOW - timedelta(minutes=idle_minutes), current_session=current_session)


def _decide(text: str, *candidates: Candidate):
    return decide_thread(
        text=text,
        embedding=_embed(text),
        candidates=candidates,
        now=NOW,
        inactivity=INACTIVITY,
        model=load_model("task"),
    )


def _similarity(a: str, b: str) -> float:
    return round(float(_embed(a) @ _embed(b)), 4)


# --- decide_thread: the pure decision ---------------------------------------------------------------


def test_first_message_opens_a_thread() -> None:
    decision = _decide(LOGIN)

    assert (decision.event, decision.thread_id, decision.confidence) == ("NEW_TOPIC", None, 1.0)
    assert decision.signals == {"reason": "no open thread"}


def test_related_message_follows_up_the_active_thread() -> None:
    decision = _decide(LOGIN_DETAIL, _candidate("login", LOGIN))

    assert (decision.event, decision.thread_id) == ("FOLLOW_UP", "login")
    assert decision.signals["reason"] == "scorer: continues"
    assert decision.signals["profile"] == "task"
    assert decision.signals["p_new_topic"] < load_model("task").new_topic.threshold
    assert decision.confidence == pytest.approx(1 - decision.signals["p_new_topic"], abs=1e-4)
    assert decision.signals["similarities"] == {
        "login": pytest.approx(_similarity(LOGIN_DETAIL, LOGIN), abs=1e-3)
    }


def test_new_topic_cue_opens_a_thread_even_when_the_text_is_similar() -> None:
    text = "Actually, a different question about my login"
    assert _similarity(text, LOGIN) >= 0.30

    decision = _decide(text, _candidate("login", LOGIN))

    assert (decision.event, decision.thread_id, decision.confidence) == ("NEW_TOPIC", None, 0.9)
    assert decision.signals["reason"] == "new-topic cue"


@pytest.mark.parametrize(
    "text",
    ["Can you also find me a hotel in Paris for tonight?", "The invoice for March charged my card twice"],
)
def test_unrelated_request_or_statement_opens_a_thread(text: str) -> None:
    decision = _decide(text, _candidate("login", LOGIN))

    assert (decision.event, decision.thread_id) == ("NEW_TOPIC", None)
    assert decision.signals["reason"] in ("scorer: new topic", "unrelated to the active thread")


def test_thanks_resolves_the_thread_it_talks_about_not_the_active_one() -> None:
    s3 = _candidate("s3", S3_SWITCH)  # the active thread
    login = _candidate("login", LOGIN, idle_minutes=5)

    decision = _decide(LOGIN_THANKS, s3, login)

    assert (decision.event, decision.thread_id) == ("RESOLUTION", "login")
    assert decision.confidence == decision.signals["p_resolution"] >= load_model("task").resolution.threshold
    assert decision.signals["reason"] == "resolution of the thread it talks about"
    assert decision.signals["similarities"]["login"] > 0.40 > decision.signals["similarities"]["s3"]


def test_bare_thanks_resolves_the_active_thread() -> None:
    decision = _decide(
        "Thanks, that's all!", _candidate("s3", S3_SWITCH), _candidate("login", LOGIN, idle_minutes=5)
    )

    assert (decision.event, decision.thread_id) == ("RESOLUTION", "s3")
    assert decision.signals["reason"] == "resolution of the active thread"


def test_thanks_followed_by_a_new_request_is_not_a_resolution() -> None:
    text = "Thanks. Now can you find me a flight to Boston on Friday?"

    decision = _decide(text, _candidate("login", LOGIN))

    assert (decision.event, decision.thread_id) == ("NEW_TOPIC", None)


def test_message_about_an_earlier_thread_returns_to_it() -> None:
    decision = _decide(LOGIN_RETURN, _candidate("s3", S3_SWITCH), _candidate("login", LOGIN, idle_minutes=5))

    assert (decision.event, decision.thread_id, decision.confidence) == ("RETURN", "login", 0.85)
    assert decision.signals["reason"] == "return cue"


PRINTER = "My printer shows error E42 and won't print double-sided"
TONER = "By the way, how do I order new toner cartridges?"


def _resolved(name: str, text: str, idle_minutes: float = 5) -> Candidate:
    c = _candidate(name, text, idle_minutes)
    return Candidate(c.thread_id, c.state, c.last_activity_at, resolved=True)


@pytest.mark.parametrize(
    "text",
    [
        "Back to the printer: the E42 error is back",
        "The E42 error on my printer came back",
        "My printer stopped working again, E42 on the display",
        "Going back to the printer, does the duplex roller need cleaning every month?",
    ],
)
def test_a_return_to_a_resolved_thread_reopens_it_rather_than_opening_one(text: str) -> None:
    decision = _decide(text, _candidate("toner", TONER), _resolved("printer", PRINTER))

    assert (decision.event, decision.thread_id) == ("RETURN", "printer")
    assert "reopens" in decision.signals["reason"]


def test_a_new_problem_is_not_sent_back_to_a_resolved_thread() -> None:
    decision = _decide(
        "I was charged twice on my invoice", _candidate("toner", TONER), _resolved("printer", PRINTER)
    )

    assert (decision.event, decision.thread_id) == ("NEW_TOPIC", None)


def test_a_fix_of_the_active_thread_is_not_a_recurrence_of_a_resolved_one() -> None:
    decision = _decide(
        "The printer works again after the update, thanks",
        _candidate("printer2", "My printer is offline after the update"),
        _resolved("printer", PRINTER),
    )

    assert (decision.event, decision.thread_id) == ("RESOLUTION", "printer2")


def test_short_reply_follows_a_fresh_thread_but_not_a_stale_one() -> None:
    fresh = _decide("ok", _candidate("login", LOGIN, idle_minutes=29))
    stale = _decide("ok", _candidate("login", LOGIN, idle_minutes=31))

    assert (fresh.event, fresh.thread_id, fresh.signals["reason"]) == (
        "FOLLOW_UP",
        "login",
        "scorer: continues",
    )
    assert fresh.signals["active_idle_seconds"] == 29 * 60
    assert (stale.event, stale.thread_id) == ("NEW_TOPIC", None)
    assert stale.signals["active_idle_seconds"] == 31 * 60


def test_a_thread_of_an_expired_session_takes_no_bare_follow_up() -> None:
    decision = _decide("ok", _candidate("login", LOGIN, idle_minutes=1, current_session=False))

    assert (decision.event, decision.thread_id) == ("NEW_TOPIC", None)
    assert decision.signals["reason"] == "the active thread went dormant or its session expired"


def test_related_message_after_inactivity_returns_to_the_dormant_thread() -> None:
    text = "My login is broken again"

    decision = _decide(text, _candidate("login", LOGIN, idle_minutes=120))

    assert (decision.event, decision.thread_id) == ("RETURN", "login")
    assert decision.signals["reason"] == "back to a dormant thread"


# --- through Agent.process_message (offline, real PostgreSQL) -----------------------------------------


async def _agent(config: dict | None = None):
    builder = AgentFrameworkBuilder().with_intent_categories(CATEGORIES)
    if config:
        builder.with_config(config)
    agent = await builder.build(None)
    assert agent.offline
    return agent


async def _thread(thread_id: str) -> Thread:
    return await Thread.objects.aget(pk=thread_id)


@pytest.mark.django_db(transaction=True)
async def test_seed_scripted_conversation() -> None:
    # Offline replies would escalate the thread and silence the bot in it: this test is about threads.
    agent = await _agent({"fallback_config": {"escalate": False}})

    opened = await agent.process_message(user_id="alice", message=LOGIN)
    detail = await agent.process_message(user_id="alice", message=LOGIN_DETAIL)
    switched = await agent.process_message(user_id="alice", message=S3_SWITCH)
    thanks = await agent.process_message(user_id="alice", message=LOGIN_THANKS)

    login_id, s3_id = opened["thread_id"], switched["thread_id"]
    assert [(r["thread_event"], r["thread_id"]) for r in (opened, detail, switched, thanks)] == [
        ("NEW_TOPIC", login_id),
        ("FOLLOW_UP", login_id),
        ("NEW_TOPIC", s3_id),
        ("RESOLUTION", login_id),
    ]
    assert login_id != s3_id
    assert len({r["session_id"] for r in (opened, detail, switched, thanks)}) == 1
    assert all(r["status"] == "done" and r["offline"] for r in (opened, detail, switched, thanks))

    login = await _thread(login_id)
    s3 = await _thread(s3_id)
    assert (login.status, login.resolution, login.topic, login.intent) == (
        "resolved",
        LOGIN_THANKS,
        LOGIN,
        "LOGIN",
    )
    assert login.resolved_at is not None
    assert login.topic_weight == 2  # the opening and the follow-up; the thanks is not folded in
    assert (s3.status, s3.resolution, s3.resolved_at, s3.topic, s3.intent) == (
        "open",
        "",
        None,
        S3_SWITCH,
        "STORAGE",
    )
    assert await Thread.objects.acount() == 2

    stored = [
        (m.role, m.content, m.thread_event)
        async for m in Message.objects.filter(thread_id=login_id).order_by("created_at")
    ]
    assert [(role, event) for role, _, event in stored] == [
        ("user", "NEW_TOPIC"),
        ("assistant", ""),
        ("user", "FOLLOW_UP"),
        ("assistant", ""),
        ("user", "RESOLUTION"),
        ("assistant", ""),
    ]
    assert [content for role, content, _ in stored if role == "user"] == [LOGIN, LOGIN_DETAIL, LOGIN_THANKS]
    assert await Message.objects.filter(thread_id=s3_id).acount() == 2

    # The problem coming back right after it was resolved reopens its thread.
    again = await agent.process_message(user_id="alice", message="My login is broken again")
    assert (again["thread_event"], again["thread_id"]) == ("FOLLOW_UP", login_id)
    reopened = await _thread(login_id)
    assert (reopened.status, reopened.resolved_at) == ("open", None)


@pytest.mark.django_db(transaction=True)
async def test_a_return_to_an_earlier_resolved_thread_reopens_it_and_says_so() -> None:
    agent = await _agent({"fallback_config": {"escalate": False}})
    printer = await agent.process_message(user_id="carol", message=PRINTER)
    fixed = await agent.process_message(
        user_id="carol", message="Thanks, cleaning the roller fixed the E42 error!"
    )
    toner = await agent.process_message(user_id="carol", message=TONER)
    back = await agent.process_message(user_id="carol", message="Back to the printer: the E42 error is back")

    assert (fixed["thread_event"], fixed["thread_id"]) == ("RESOLUTION", printer["thread_id"])
    assert toner["thread_event"] == "NEW_TOPIC" and toner["thread_id"] != printer["thread_id"]
    assert (back["thread_event"], back["thread_id"]) == ("RETURN", printer["thread_id"])
    thread = await _thread(printer["thread_id"])
    assert (thread.status, thread.resolved_at, thread.resolution) == ("open", None, "")
    kinds = [a.kind async for a in ThreadActivity.objects.filter(thread=thread).order_by("created_at", "pk")]
    assert kinds == ["opened", "resolved", "returned", "reopened"]
    assert await Thread.objects.filter(user__external_id="carol").acount() == 2


@pytest.mark.django_db(transaction=True)
async def test_candidates_keep_the_latest_resolved_threads_and_the_open_ones() -> None:
    agent = await _agent({"fallback_config": {"escalate": False}})
    await agent.process_message(user_id="dave", message=LOGIN)
    user = await EndUser.objects.aget(external_id="dave")
    thread = await Thread.objects.aget(user=user)
    session = await ChatSession.objects.aget(user=user)
    now = timezone.now()
    made = [
        await Thread.objects.acreate(
            user=user,
            session=session,
            topic=f"resolved {i}",
            status=Thread.Status.RESOLVED,
            last_activity_at=now - timedelta(minutes=i + 1),
        )
        for i in range(5)
    ]

    candidates = await sync_to_async(selectors.thread_candidates)(user=user)

    # the open thread, then the three most recently resolved; older resolved ones are left out
    assert [t.pk for t in candidates] == [thread.pk] + [t.pk for t in made[:3]]
    one = await sync_to_async(selectors.thread_candidates)(user=user, limit=1)
    assert [t.pk for t in one] == [thread.pk] + [t.pk for t in made[:3]]


@pytest.mark.django_db(transaction=True)
async def test_candidates_carry_their_vectors_as_float32_arrays_and_save_whole() -> None:
    agent = await _agent({"fallback_config": {"escalate": False}})
    await agent.process_message(user_id="erin", message=LOGIN)
    user = await EndUser.objects.aget(external_id="erin")
    stored = await Thread.objects.aget(user=user)
    bare = await Thread.objects.acreate(
        user=user, session_id=stored.session_id, topic="no vectors", last_activity_at=stored.last_activity_at
    )

    candidates = await sync_to_async(selectors.thread_candidates)(user=user)

    by_pk = {t.pk: t for t in candidates}
    read = by_pk[stored.pk]
    assert read.get_deferred_fields() == set()
    for name in ("topic_embedding", "opening_embedding", "last_user_embedding"):
        value = getattr(read, name)
        assert isinstance(value, np.ndarray) and value.dtype == np.float32 and value.flags.writeable
        assert value.tolist() == getattr(stored, name)  # the same float32s as the model field's list
        assert getattr(by_pk[bare.pk], name) is None
    # A candidate saved whole writes its vectors back unchanged (nothing left deferred to lose).
    read.topic = "renamed"
    await sync_to_async(read.save)()
    again = await Thread.objects.aget(pk=stored.pk)
    assert (again.topic, again.topic_embedding, again.last_user_embedding) == (
        "renamed",
        stored.topic_embedding,
        stored.last_user_embedding,
    )


@pytest.mark.django_db(transaction=True)
async def test_each_user_has_their_own_threads() -> None:
    agent = await _agent()

    alice = await agent.process_message(user_id="alice", message=LOGIN)
    bob = await agent.process_message(user_id="bob", message=LOGIN)
    bob_detail = await agent.process_message(user_id="bob", message=LOGIN_DETAIL)
    bob_thanks = await agent.process_message(user_id="bob", message=LOGIN_THANKS)

    assert (bob["thread_event"], bob_detail["thread_event"], bob_thanks["thread_event"]) == (
        "NEW_TOPIC",
        "FOLLOW_UP",
        "RESOLUTION",
    )
    assert bob["thread_id"] != alice["thread_id"]
    assert bob_detail["thread_id"] == bob_thanks["thread_id"] == bob["thread_id"]
    assert bob["session_id"] != alice["session_id"]
    alice_thread = await _thread(alice["thread_id"])
    assert (alice_thread.status, alice_thread.topic_weight, alice_thread.resolution) == ("open", 1, "")
    assert await Message.objects.filter(thread=alice_thread).acount() == 2
    assert [t.pk async for t in Thread.objects.filter(user__external_id="alice")] == [alice_thread.pk]


@pytest.mark.django_db(transaction=True)
async def test_idle_thread_goes_dormant_and_wakes_up_on_return() -> None:
    agent = await _agent({"session_config": {"thread_inactivity_threshold": 1}})  # one minute
    login = await agent.process_message(user_id="alice", message=LOGIN)
    five_minutes_ago = timezone.now() - timedelta(minutes=5)
    await Thread.objects.filter(pk=login["thread_id"]).aupdate(last_activity_at=five_minutes_ago)

    short = await agent.process_message(user_id="alice", message="ok")

    assert short["thread_event"] == "NEW_TOPIC"  # no bare follow-up to a thread idle past the threshold
    assert short["thread_id"] != login["thread_id"]
    dormant = await _thread(login["thread_id"])
    assert dormant.status == "dormant"
    assert dormant.last_activity_at == five_minutes_ago

    back = await agent.process_message(user_id="alice", message=LOGIN_RETURN)

    assert (back["thread_event"], back["thread_id"]) == ("RETURN", login["thread_id"])
    woken = await _thread(login["thread_id"])
    assert woken.status == "open"
    assert woken.last_activity_at > five_minutes_ago
    assert woken.topic_weight == 2
    assert (await _thread(short["thread_id"])).status == "open"


@pytest.mark.django_db(transaction=True)
async def test_fresh_thread_stays_open_and_takes_short_replies() -> None:
    agent = await _agent({"session_config": {"thread_inactivity_threshold": 1}})
    login = await agent.process_message(user_id="alice", message=LOGIN)

    short = await agent.process_message(user_id="alice", message="ok")

    assert (short["thread_event"], short["thread_id"]) == ("FOLLOW_UP", login["thread_id"])
    assert (await _thread(login["thread_id"])).status == "open"


@pytest.mark.django_db(transaction=True)
async def test_expired_session_is_replaced_and_its_threads_kept() -> None:
    agent = await _agent()
    first = await agent.process_message(user_id="alice", message=LOGIN)
    expired_at = timezone.now() - timedelta(seconds=1)
    await ChatSession.objects.filter(pk=first["session_id"]).aupdate(expires_at=expired_at)

    second = await agent.process_message(user_id="alice", message=BILLING)

    assert second["session_id"] != first["session_id"]
    assert second["thread_event"] == "NEW_TOPIC"
    old = await ChatSession.objects.aget(pk=first["session_id"])
    new = await ChatSession.objects.aget(pk=second["session_id"])
    assert (old.status, old.ended_at, old.expires_at) == ("expired", expired_at, expired_at)
    assert (new.status, new.ended_at, new.ttl_seconds) == ("active", None, 3600)
    assert new.expires_at - new.last_activity_at == timedelta(seconds=3600)
    new_thread = await _thread(second["thread_id"])
    assert str(new_thread.session_id) == second["session_id"]

    user = await EndUser.objects.aget(external_id="alice")
    listed = await asyncio.to_thread(lambda: [str(t.pk) for t in selectors.threads_for_user(user=user)])
    assert listed == [second["thread_id"], first["thread_id"]]
    sessions = await asyncio.to_thread(lambda: [str(s.pk) for s in selectors.sessions_for_user(user=user)])
    assert sessions == [second["session_id"], first["session_id"]]


@pytest.mark.django_db(transaction=True)
async def test_live_session_is_extended_by_a_later_message() -> None:
    agent = await _agent({"session_config": {"ttl_seconds": 600}})
    first = await agent.process_message(user_id="alice", message=LOGIN)
    # As if the first message came two minutes ago (a message within a minute leaves the expiry).
    await ChatSession.objects.filter(pk=first["session_id"]).aupdate(
        last_activity_at=F("last_activity_at") - timedelta(minutes=2),
        expires_at=F("expires_at") - timedelta(minutes=2),
    )
    before = await ChatSession.objects.aget(pk=first["session_id"])

    second = await agent.process_message(user_id="alice", message=LOGIN_DETAIL)

    after = await ChatSession.objects.aget(pk=first["session_id"])
    assert second["session_id"] == first["session_id"]
    assert after.last_activity_at > before.last_activity_at
    assert after.expires_at == after.last_activity_at + timedelta(seconds=600)
    assert await ChatSession.objects.acount() == 1


@pytest.mark.django_db(transaction=True)
async def test_double_texting_through_process_message_opens_one_thread() -> None:
    agent = await _agent()

    results = await asyncio.gather(
        agent.process_message(user_id="alice", message=LOGIN),
        agent.process_message(user_id="alice", message="My login is broken, I can't sign in"),
    )

    assert sorted(r["thread_event"] for r in results) == ["FOLLOW_UP", "NEW_TOPIC"]
    assert results[0]["thread_id"] == results[1]["thread_id"]
    assert await Thread.objects.acount() == 1
    thread = await Thread.objects.aget()
    assert thread.topic_weight == 2
    assert await Message.objects.filter(thread=thread, role="user").acount() == 2


@pytest.mark.django_db(transaction=True)
def test_simultaneous_turns_of_one_user_are_serialised_by_the_user_lock() -> None:
    """Worker threads preparing two messages of one user at the same instant still open one thread.

    ``process_message`` above runs its sync steps on one thread, so it cannot race; Celery worker
    threads can, and only the per-user advisory lock keeps them from both opening a thread.
    """
    agent = AgentFrameworkBuilder().with_intent_categories(CATEGORIES).build_sync(None)
    users = ["alice", "bob", "carol"]
    pairs = [
        (
            pipeline.accept(agent, user_id=u, message=LOGIN).message.pk,
            pipeline.accept(agent, user_id=u, message="My login is broken, I can't sign in").message.pk,
        )
        for u in users
    ]
    message_ids = [mid for pair in pairs for mid in pair]
    barrier = threading.Barrier(len(message_ids))

    def prepare(message_id):
        try:
            barrier.wait(timeout=10)
            for _ in range(500):  # as the Celery task does: wait for the user's earlier message
                try:
                    return pipeline.prepare(agent, message_id=message_id)
                except pipeline.EarlierMessagePending:
                    time.sleep(0.01)
            raise AssertionError("the earlier message was never placed")
        finally:
            connections.close_all()

    with ThreadPoolExecutor(len(message_ids)) as pool:
        prepared = list(pool.map(prepare, message_ids))

    assert all(p.result is None and p.ctx is not None for p in prepared)
    for user in users:
        threads = list(Thread.objects.filter(user__external_id=user))
        assert len(threads) == 1, f"{user} got {len(threads)} threads"
        events = sorted(Message.objects.filter(user__external_id=user).values_list("thread_event", flat=True))
        assert events == ["FOLLOW_UP", "NEW_TOPIC"]
        assert set(Message.objects.filter(user__external_id=user).values_list("thread_id", flat=True)) == {
            threads[0].pk
        }
        assert threads[0].topic_weight == 2


@pytest.mark.django_db(transaction=True)
async def test_double_texting_places_messages_in_arrival_order() -> None:
    agent = await _agent()
    first = (await sync_to_async(pipeline.accept)(agent, user_id="alice", message=LOGIN)).message
    second = (await sync_to_async(pipeline.accept)(agent, user_id="alice", message=LOGIN_DETAIL)).message

    # The later message is asked first: it waits for the earlier one instead of opening a thread.
    with pytest.raises(pipeline.EarlierMessagePending):
        await sync_to_async(pipeline.prepare)(agent, message_id=second.pk)
    assert (await Message.objects.aget(pk=second.pk)).status == "pending"
    assert await Thread.objects.acount() == 0

    later, earlier = await asyncio.gather(agent.run_turn(second.pk), agent.run_turn(first.pk))

    assert (earlier["thread_event"], later["thread_event"]) == ("NEW_TOPIC", "FOLLOW_UP")
    assert later["thread_id"] == earlier["thread_id"]
    placed = [
        m.content
        async for m in Message.objects.filter(role="user", thread_id=earlier["thread_id"]).order_by(
            "created_at"
        )
    ]
    assert placed == [LOGIN, LOGIN_DETAIL]
