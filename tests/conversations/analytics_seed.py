"""Conversations with known figures for the analytics dashboard's tests (endpoint and browser).

Two agents over 2026-03-01..03: ``support`` with three threads, ``shop`` with one. The figures the
dashboard must show for them are spelled out in ``EXPECTED_SUPPORT`` (worked out by hand below).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from conversations.models import Agent, ChatSession, EndUser, Escalation, Message, Thread

START, END = "2026-03-01", "2026-03-03"


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 3, day, hour, minute, second, tzinfo=UTC)


def _message(thread: Thread, when: datetime, role: str, **fields: Any) -> Message:
    message = Message.objects.create(
        user=thread.user, session=thread.session, thread=thread, role=role, content=f"{role} text", **fields
    )
    Message.objects.filter(pk=message.pk).update(created_at=when)
    return message


def _thread(user: EndUser, when: datetime, topic: str, intent: str, **fields: Any) -> Thread:
    session = ChatSession.objects.create(user=user, ttl_seconds=3600, last_activity_at=when, expires_at=when)
    thread = Thread.objects.create(
        user=user, session=session, topic=topic, intent=intent, last_activity_at=when, **fields
    )
    Thread.objects.filter(pk=thread.pk).update(opened_at=when)
    return thread


def _escalation(thread: Thread, when: datetime, reason: str) -> Escalation:
    escalation = Escalation.objects.create(thread=thread, user=thread.user, reason=reason)
    Escalation.objects.filter(pk=escalation.pk).update(created_at=when)
    return escalation


def seed() -> dict[str, Any]:
    """Write the rows; return the agents."""
    support = Agent.objects.create(name="support")
    shop = Agent.objects.create(name="shop")
    alice = EndUser.objects.create(agent=support, external_id="alice")
    bob = EndUser.objects.create(agent=shop, external_id="bob")

    # Before the range: counted nowhere.
    early = _thread(alice, datetime(2026, 2, 28, 23, 59, tzinfo=UTC), "Before", "QUERY")
    _message(early, datetime(2026, 2, 28, 23, 59, tzinfo=UTC), Message.Role.USER, intent="QUERY")

    # Day 1. A: outage, escalated, a human answered after 300 s, resolved.
    a = _thread(alice, at(1, 10), "Login broken", "OUTAGE", status=Thread.Status.RESOLVED, escalated=True)
    _message(a, at(1, 10), Message.Role.USER, intent="OUTAGE", confidence=0.9)
    _message(
        a,
        at(1, 10, 0, 2),
        Message.Role.ASSISTANT,
        model="claude-sonnet-5-5",
        usage={"input_tokens": 1000, "output_tokens": 200},
        llm_latency_ms=800.0,
    )
    _escalation(a, at(1, 10, 0, 3), "low confidence")
    _message(a, at(1, 10, 5, 3), Message.Role.HUMAN_AGENT)
    # B: billing, answered offline, left open.
    b = _thread(alice, at(1, 11), "Refund please", "BILLING")
    _message(b, at(1, 11), Message.Role.USER, intent="BILLING", confidence=0.7)
    # As the turn stores it: an offline reply has model "offline", no tokens and an LLM latency of 0.
    _message(
        b,
        at(1, 11, 0, 1),
        Message.Role.ASSISTANT,
        model="offline",
        offline=True,
        usage={"input_tokens": 0, "output_tokens": 0},
        llm_latency_ms=0.0,
    )

    # Day 2. C: the same topic again, escalated, no human reply yet; then a turn that failed.
    c = _thread(alice, at(2, 9), "Refund please", "BILLING", escalated=True)
    _message(c, at(2, 9), Message.Role.USER, intent="BILLING", confidence=0.95)
    _message(
        c,
        at(2, 9, 0, 2),
        Message.Role.ASSISTANT,
        model="claude-haiku-5-5",
        usage={"input_tokens": 2000, "output_tokens": 400},
        llm_latency_ms=1200.0,
    )
    _escalation(c, at(2, 11), "ESCALATION intent")
    _message(c, at(2, 12), Message.Role.USER, status=Message.Status.FAILED)

    # The other agent, day 2: a model with no price.
    d = _thread(bob, at(2, 15), "Where is my parcel", "QUERY")
    _message(d, at(2, 15), Message.Role.USER, intent="QUERY", confidence=0.8)
    _message(
        d,
        at(2, 15, 0, 1),
        Message.Role.ASSISTANT,
        model="mystery-model",
        usage={"input_tokens": 500, "output_tokens": 50},
        llm_latency_ms=400.0,
    )
    return {"support": support, "shop": shop}


DAYS = ["2026-03-01", "2026-03-02", "2026-03-03"]

EXPECTED_SUPPORT: dict[str, Any] = {
    "activity": {
        "days": DAYS,
        "messages": [5, 3, 0],
        "user_messages": [2, 2, 0],
        "bot_messages": [2, 1, 0],
        "human_messages": [1, 0, 0],
        "offline_turns": [1, 0, 0],
        "failed_turns": [0, 1, 0],
        "conversations": [2, 1, 0],
    },
    "outcomes": {
        "conversations": 3,
        "resolved": 1,
        "escalated": 2,
        "resolution_rate": 0.3333,
        "escalation_rate": 0.6667,
    },
    "intents": [
        {"intent": "BILLING", "messages": 2},
        {"intent": "", "messages": 1},
        {"intent": "OUTAGE", "messages": 1},
    ],
    "escalation_reasons": [
        {"reason": "ESCALATION intent", "escalations": 1},
        {"reason": "low confidence", "escalations": 1},
    ],
    "first_human_response": {
        "escalations": 2,
        "answered": 1,
        "waiting": 1,
        "p50_seconds": 300.0,
        "p95_seconds": 300.0,
    },
    "llm_latency": {
        "days": DAYS,
        "replies": [1, 1, 0],
        "p50_ms": [800.0, 1200.0, None],
        "p95_ms": [800.0, 1200.0, None],
        # percentile_cont interpolates: 800 + 0.5 * 400 and 800 + 0.95 * 400.
        "overall": {"replies": 2, "p50_ms": 1000.0, "p95_ms": 1180.0},
    },
    "tokens": {
        "days": DAYS,
        "input_tokens": [1000, 2000, 0],
        "output_tokens": [200, 400, 0],
        # sonnet 3 / 15 dollars per million: 1000*3 + 200*15 = 6000 micro-dollars; haiku 1 / 5: 4000.
        "cost_usd": [0.006, 0.004, 0.0],
        "models": [
            {
                "model": "claude-sonnet-5-5",
                "input_tokens": 1000,
                "output_tokens": 200,
                "cost_usd": 0.006,
                "priced": True,
            },
            {
                "model": "claude-haiku-5-5",
                "input_tokens": 2000,
                "output_tokens": 400,
                "cost_usd": 0.004,
                "priced": True,
            },
        ],
        "total_cost_usd": 0.01,
        "unpriced_models": [],
    },
    "unresolved_topics": [
        {
            "topic": "Refund please",
            "intent": "BILLING",
            "conversations": 2,
            "escalated": 1,
            "last_activity_at": "2026-03-02T09:00:00+00:00",
        }
    ],
}
