"""Figures for the ops dashboard: one SQL aggregate each, over one agent (or all) and a date range.

Each function runs one query (``GROUP BY`` day, intent, reason...) and returns plain JSON-ready data;
nothing loops over messages in Python. Days are calendar days in the current time zone
(``TIME_ZONE``), ``start`` and ``end`` included. ``analytics_report`` gathers them all for the
dashboard's JSON endpoint (``conversations.dashboard``).

What counts as what:

* a *conversation* is a thread; it belongs to the day it was opened;
* *resolution rate*: of the threads opened in the range, the share resolved now;
* *escalation rate*: of the threads opened in the range, the share that ever had an escalation;
* *time to first human response*: for each escalation created in the range, from its creation to the
  first human-agent message in its thread after it (escalations still waiting are counted apart);
* *LLM latency*: ``llm_latency_ms`` of the bot's replies, offline ones left out (no model ran);
* *tokens and cost*: ``usage`` of the bot's replies, priced per model with ``AGENTFLOW["MODEL_PRICES"]``
  (US dollars per million input / output tokens); a model without a price has tokens but no cost;
* *offline turns*: bot replies written in offline mode; *failed turns*: user messages whose turn failed.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any

from django.db import connection, transaction
from django.db.models import (
    Aggregate,
    Count,
    F,
    FloatField,
    IntegerField,
    Max,
    Q,
    QuerySet,
    Sum,
)
from django.db.models.fields.json import KeyTextTransform
from django.db.models.functions import Cast, Lower, TruncDate
from django.utils import timezone

from agentflow.conf import ModelPrice, conf

from .models import Agent, Escalation, Message, Thread

TOP_LIMIT = 10  # rows of the "top" tables (intents are all shown)
ANALYTICS_WORK_MEM = "64MB"


class Percentile(Aggregate):
    """PostgreSQL's ``percentile_cont(fraction) WITHIN GROUP (ORDER BY expression)``."""

    function = "percentile_cont"
    name = "Percentile"
    output_field = FloatField()
    template = "%(function)s(%(fraction)s) WITHIN GROUP (ORDER BY %(expressions)s)"

    def __init__(self, expression: Any, fraction: float, **extra: Any) -> None:
        if not 0 <= fraction <= 1:
            raise ValueError("fraction must be from 0 to 1")
        super().__init__(expression, fraction=float(fraction), **extra)


@dataclass(frozen=True)
class Scope:
    """What the dashboard looks at: one agent (None: every agent) and days ``start``..``end`` included."""

    agent: Agent | None
    start: date
    end: date

    @property
    def since(self) -> datetime:
        return timezone.make_aware(datetime.combine(self.start, time.min))

    @property
    def until(self) -> datetime:
        """The first instant after the range (exclusive bound)."""
        return timezone.make_aware(datetime.combine(self.end + timedelta(days=1), time.min))

    def days(self) -> list[date]:
        return [self.start + timedelta(days=n) for n in range((self.end - self.start).days + 1)]


def _messages(scope: Scope) -> QuerySet[Message]:
    rows = Message.objects.filter(created_at__gte=scope.since, created_at__lt=scope.until)
    return rows.filter(user__agent=scope.agent) if scope.agent is not None else rows


def _threads(scope: Scope) -> QuerySet[Thread]:
    rows = Thread.objects.filter(opened_at__gte=scope.since, opened_at__lt=scope.until)
    return rows.filter(user__agent=scope.agent) if scope.agent is not None else rows


def _escalations(scope: Scope) -> QuerySet[Escalation]:
    rows = Escalation.objects.filter(created_at__gte=scope.since, created_at__lt=scope.until)
    return rows.filter(user__agent=scope.agent) if scope.agent is not None else rows


def _day() -> TruncDate:
    return TruncDate("created_at", tzinfo=timezone.get_current_timezone())


def _series(
    scope: Scope, rows: Iterable[Mapping[str, Any]], fields: list[str], missing: Any = 0
) -> dict[str, list[Any]]:
    """Per-day rows spread over every day of the range (days without a row get ``missing``)."""
    by_day = {row["day"]: row for row in rows}
    series: dict[str, list[Any]] = {"days": [d.isoformat() for d in scope.days()]}
    for name in fields:
        series[name] = [by_day[d][name] if d in by_day else missing for d in scope.days()]
    return series


def _rate(part: int, whole: int) -> float | None:
    return round(part / whole, 4) if whole else None


def activity_per_day(scope: Scope) -> dict[str, list[Any]]:
    """Conversations opened and messages (by role) per day."""
    messages = (
        _messages(scope)
        .annotate(day=_day())
        .values("day")
        .annotate(
            messages=Count("created_at"),
            user_messages=Count("created_at", filter=Q(role=Message.Role.USER)),
            bot_messages=Count("created_at", filter=Q(role=Message.Role.ASSISTANT)),
            human_messages=Count("created_at", filter=Q(role=Message.Role.HUMAN_AGENT)),
            offline_turns=Count("created_at", filter=Q(role=Message.Role.ASSISTANT, offline=True)),
            failed_turns=Count("created_at", filter=Q(role=Message.Role.USER, status=Message.Status.FAILED)),
        )
    )
    threads = (
        _threads(scope)
        .annotate(day=TruncDate("opened_at", tzinfo=timezone.get_current_timezone()))
        .values("day")
        .annotate(conversations=Count("id"))
    )
    series = _series(
        scope,
        messages,
        ["messages", "user_messages", "bot_messages", "human_messages", "offline_turns", "failed_turns"],
    )
    series["conversations"] = _series(scope, threads, ["conversations"])["conversations"]
    return series


def intent_mix(scope: Scope) -> list[dict[str, Any]]:
    """User messages per intent (``""``: not classified), most frequent first."""
    rows = (
        _messages(scope)
        .filter(role=Message.Role.USER)
        .values("intent")
        .annotate(messages=Count("created_at"))
        .order_by("-messages", "intent")
    )
    return [{"intent": row["intent"], "messages": row["messages"]} for row in rows]


def outcomes(scope: Scope) -> dict[str, Any]:
    """Of the conversations opened in the range: how many, resolved, escalated, and the two rates."""
    # ``IN (SELECT thread_id ...)``: one hashed set of escalated threads, not a probe per thread.
    escalated = Escalation.objects.values("thread_id")
    totals = _threads(scope).aggregate(
        conversations=Count("id"),
        resolved=Count("id", filter=Q(status=Thread.Status.RESOLVED)),
        escalated=Count("id", filter=Q(id__in=escalated)),
    )
    return {
        **totals,
        "resolution_rate": _rate(totals["resolved"], totals["conversations"]),
        "escalation_rate": _rate(totals["escalated"], totals["conversations"]),
    }


def escalation_reasons(scope: Scope) -> list[dict[str, Any]]:
    """Escalations created in the range per reason, most frequent first (at most ``TOP_LIMIT``)."""
    rows = (
        _escalations(scope)
        .values("reason")
        .annotate(escalations=Count("id"))
        .order_by("-escalations", "reason")
    )
    return [{"reason": row["reason"], "escalations": row["escalations"]} for row in rows[:TOP_LIMIT]]


_HUMAN_RESPONSE_SQL = """
WITH answered AS MATERIALIZED (
    SELECT e.created_at,
           (SELECT min(m.created_at) FROM conversations_message m
             WHERE m.thread_id = e.thread_id AND m.role = 'human_agent' AND m.created_at >= e.created_at
           ) AS first_reply
      FROM conversations_escalation e
      {join}
     WHERE e.created_at >= %s AND e.created_at < %s {agent}
)
SELECT count(*),
       count(first_reply),
       percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM first_reply - created_at)),
       percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM first_reply - created_at))
  FROM answered
"""


def first_human_response(scope: Scope) -> dict[str, Any]:
    """Seconds from an escalation to the first human reply in its thread (p50, p95), and how many wait.

    Raw SQL: a correlated ``min()`` per escalation, then ``percentile_cont`` over the differences.
    """
    params: list[Any] = [scope.since, scope.until]
    join = agent = ""
    if scope.agent is not None:
        join = "JOIN conversations_enduser u ON u.id = e.user_id"
        agent = "AND u.agent_id = %s"
        params.append(scope.agent.pk)
    with connection.cursor() as cursor:
        cursor.execute(_HUMAN_RESPONSE_SQL.format(join=join, agent=agent), params)
        escalations, answered, p50, p95 = cursor.fetchone()
    return {
        "escalations": escalations,
        "answered": answered,
        "waiting": escalations - answered,
        "p50_seconds": None if p50 is None else round(float(p50), 1),
        "p95_seconds": None if p95 is None else round(float(p95), 1),
    }


def llm_latency(scope: Scope) -> dict[str, Any]:
    """p50 and p95 of the LLM's latency (ms) per day and over the range."""
    # Offline replies store no llm_latency_ms (no model was called); older rows may hold 0.0.
    replies = _messages(scope).filter(
        role=Message.Role.ASSISTANT, offline=False, llm_latency_ms__isnull=False
    )
    percentiles = {
        "replies": Count("created_at"),
        "p50_ms": Percentile("llm_latency_ms", 0.5),
        "p95_ms": Percentile("llm_latency_ms", 0.95),
    }
    per_day = replies.annotate(day=_day()).values("day").annotate(**percentiles)
    daily = _series(scope, per_day, ["replies", "p50_ms", "p95_ms"], missing=None)
    overall = replies.aggregate(**percentiles)
    return {
        "days": daily["days"],
        "replies": [v or 0 for v in daily["replies"]],
        "p50_ms": [None if v is None else round(v, 1) for v in daily["p50_ms"]],
        "p95_ms": [None if v is None else round(v, 1) for v in daily["p95_ms"]],
        "overall": {
            "replies": overall["replies"],
            "p50_ms": None if overall["p50_ms"] is None else round(overall["p50_ms"], 1),
            "p95_ms": None if overall["p95_ms"] is None else round(overall["p95_ms"], 1),
        },
    }


def _tokens(key: str) -> Cast:
    return Cast(KeyTextTransform(key, "usage"), IntegerField())


def tokens_and_cost(scope: Scope, prices: dict[str, ModelPrice] | None = None) -> dict[str, Any]:
    """Input and output tokens per day, and their cost in US dollars at ``AGENTFLOW["MODEL_PRICES"]``.

    SQL sums the tokens per day and model; the few (day, model) rows are then priced.
    """
    prices = conf().MODEL_PRICES if prices is None else prices
    rows = (
        _messages(scope)
        .filter(role=Message.Role.ASSISTANT, offline=False)
        .exclude(model="")
        .annotate(day=_day())
        .values("day", "model")
        .annotate(input_tokens=Sum(_tokens("input_tokens")), output_tokens=Sum(_tokens("output_tokens")))
        .order_by("day", "model")
    )
    by_day: dict[date, dict[str, float]] = {}
    per_model: dict[str, dict[str, Any]] = {}
    unpriced: set[str] = set()
    for row in rows:  # (day, model) groups, not messages
        inputs, outputs = row["input_tokens"] or 0, row["output_tokens"] or 0
        price = prices.get(row["model"])
        cost = (inputs * price.input + outputs * price.output) / 1_000_000 if price else 0.0
        if price is None:
            unpriced.add(row["model"])
        day = by_day.setdefault(row["day"], {"input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0})
        day["input_tokens"] += inputs
        day["output_tokens"] += outputs
        day["cost_usd"] += cost
        model = per_model.setdefault(
            row["model"], {"model": row["model"], "input_tokens": 0, "output_tokens": 0, "cost_usd": 0.0}
        )
        model["input_tokens"] += inputs
        model["output_tokens"] += outputs
        model["cost_usd"] += cost
    series = _series(
        scope, ({"day": d, **v} for d, v in by_day.items()), ["input_tokens", "output_tokens", "cost_usd"]
    )
    series["cost_usd"] = [round(v, 6) for v in series["cost_usd"]]
    models = sorted(per_model.values(), key=lambda m: (-m["cost_usd"], m["model"]))
    for model in models:
        model["cost_usd"] = round(model["cost_usd"], 6)
        model["priced"] = model["model"] not in unpriced
    return {
        **series,
        "models": models,
        "total_cost_usd": round(sum(m["cost_usd"] for m in models), 6),
        "unpriced_models": sorted(unpriced),
    }


def unresolved_topics(scope: Scope) -> list[dict[str, Any]]:
    """Topics of conversations opened in the range and not resolved, most frequent first."""
    rows = (
        _threads(scope)
        .exclude(status=Thread.Status.RESOLVED)
        .annotate(key=Lower("topic"))
        .values("key")
        .annotate(
            conversations=Count("id"),
            escalated=Count("id", filter=Q(escalated=True)),
            intent=Max("intent"),
            topic=Max("topic"),
            last_activity_at=Max(F("last_activity_at")),
        )
        .order_by("-conversations", "-last_activity_at")
    )
    return [
        {
            "topic": row["topic"],
            "intent": row["intent"],
            "conversations": row["conversations"],
            "escalated": row["escalated"],
            "last_activity_at": row["last_activity_at"].isoformat(),
        }
        for row in rows[:TOP_LIMIT]
    ]


@contextmanager
def analytics_session() -> Iterator[None]:
    """A transaction whose sorts and hashes get ``ANALYTICS_WORK_MEM`` (the per-day groups of a long
    range spill to disk at PostgreSQL's default 4 MB)."""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(f"SET LOCAL work_mem = '{ANALYTICS_WORK_MEM}'")
        yield


def analytics_report(scope: Scope) -> dict[str, Any]:
    """Every figure of the dashboard for ``scope`` (what ``GET /admin/analytics/data`` returns)."""
    with analytics_session():
        return _report(scope)


def _report(scope: Scope) -> dict[str, Any]:
    return {
        "agent": scope.agent.name if scope.agent is not None else None,
        "start": scope.start.isoformat(),
        "end": scope.end.isoformat(),
        "time_zone": timezone.get_current_timezone_name(),
        "activity": activity_per_day(scope),
        "outcomes": outcomes(scope),
        "intents": intent_mix(scope),
        "escalation_reasons": escalation_reasons(scope),
        "first_human_response": first_human_response(scope),
        "llm_latency": llm_latency(scope),
        "tokens": tokens_and_cost(scope),
        "unresolved_topics": unresolved_topics(scope),
    }
