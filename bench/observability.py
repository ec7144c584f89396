"""What metrics and JSON logs cost: per turn, per log line, and per scrape of /metrics.

    python bench/observability.py [--turns 20000] [--pending 1000]

Uses the configured (or embedded) PostgreSQL, like ``make run``. Prints:

- the metric updates of one turn (seven stage observations, the turn and escalation counters, one
  LLM call's counters), in microseconds;
- one turn log line through the JSON formatter (with the ids bound), against the text format;
- one ``GET /metrics`` (the process registry and the queue aggregate), with ``--pending`` waiting
  user messages in PostgreSQL, and the aggregate's own time; p50 and p95.

Rows belong to a user named bench-obs-*, deleted at the end.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ.setdefault("AGENTFLOW_LOG_LEVEL", "WARNING")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def bench_metric_updates(turns: int) -> float:
    from agentflow import metrics

    started = time.perf_counter()
    for _ in range(turns):
        for stage in metrics.STAGES:
            metrics.stage_observe("bench", stage, 0.012)
        metrics.turn_count(agent="bench", intent="billing", outcome="llm", escalated=True)
        metrics.llm_call_count(model="bench-model", usage={"input_tokens": 120, "output_tokens": 40})
    return (time.perf_counter() - started) / turns * 1e6


def bench_log_line(lines: int) -> tuple[float, float]:
    from agentflow import logs

    record_args = ("agentflow", "u-1", "t-1", "NEW_TOPIC", "billing", 0.91, False, "llm", 812.5)
    fields = {"thread_event": "NEW_TOPIC", "intent": "billing", "latency_ms": 812.5, "handled_by": "llm"}
    results = []
    for formatter in (
        logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"),
        logs.JsonFormatter(),
    ):
        stream = io.StringIO()
        handler = logging.StreamHandler(stream)
        handler.setFormatter(formatter)
        logger = logging.getLogger(f"bench.obs.{uuid.uuid4().hex[:6]}")
        logger.propagate = False
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logs.bind(agent="agentflow", message_id=uuid.uuid4(), user_id="u-1", session_id="s", thread_id="t")
        started = time.perf_counter()
        for _ in range(lines):
            logger.info(
                "turn agent=%s user=%s thread=%s event=%s intent=%s confidence=%.2f escalated=%s by=%s"
                " latency_ms=%.1f",
                *record_args,
                extra=fields,
            )
        results.append((time.perf_counter() - started) / lines * 1e6)
        logs.unbind_all()
    return results[0], results[1]


def bench_scrape(pending: int, scrapes: int) -> tuple[list[float], list[float]]:
    import django

    django.setup()
    from django.core.management import call_command
    from django.test import Client

    from conversations.models import Agent, ChatSession, EndUser, Message, Thread
    from conversations.selectors import messages_unanswered_by_agent

    call_command("migrate", verbosity=0)
    from django.utils import timezone

    agent, _ = Agent.objects.get_or_create(name="agentflow")
    user = EndUser.objects.create(agent=agent, external_id=f"bench-obs-{uuid.uuid4().hex[:8]}")
    try:
        now = timezone.now()
        session = ChatSession.objects.create(
            user=user, ttl_seconds=3600, last_activity_at=now, expires_at=now + timezone.timedelta(hours=1)
        )
        thread = Thread.objects.create(user=user, session=session, topic="bench", last_activity_at=now)
        Message.objects.bulk_create(
            Message(user=user, session=session, thread=thread, role="user", content="x", status="pending")
            for _ in range(pending)
        )
        client = Client(HTTP_HOST="localhost")
        scrape, aggregate = [], []
        for _ in range(scrapes):
            started = time.perf_counter()
            response = client.get("/metrics")
            scrape.append((time.perf_counter() - started) * 1000)
            assert response.status_code == 200
            started = time.perf_counter()
            messages_unanswered_by_agent()
            aggregate.append((time.perf_counter() - started) * 1000)
        return scrape, aggregate
    finally:
        user.delete()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=20000, help="turns' metric updates timed")
    parser.add_argument("--lines", type=int, default=20000, help="log lines formatted")
    parser.add_argument("--pending", type=int, default=1000, help="waiting user messages in PostgreSQL")
    parser.add_argument("--scrapes", type=int, default=200, help="GET /metrics timed")
    args = parser.parse_args()

    print(f"metric updates of one turn: {bench_metric_updates(args.turns):.1f} us")
    text, json_ = bench_log_line(args.lines)
    print(f"turn log line: text {text:.1f} us, json {json_:.1f} us")
    scrape, aggregate = bench_scrape(args.pending, args.scrapes)
    print(
        f"GET /metrics with {args.pending} waiting messages: p50 {pct(scrape, 50):.2f} ms,"
        f" p95 {pct(scrape, 95):.2f} ms; the queue aggregate alone p50 {pct(aggregate, 50):.2f} ms,"
        f" p95 {pct(aggregate, 95):.2f} ms"
    )


if __name__ == "__main__":
    main()
