"""Query time of each analytics dashboard figure at a million messages.

    python bench/analytics_bench.py [--messages 1000000] [--keep]

Creates a database of its own (``agentflow_analytics_bench``) on the configured PostgreSQL server
(the embedded one by default), migrates it and seeds it in SQL (``INSERT ... SELECT`` over
``generate_series``, a few seconds): two agents, 20,000 end users, 50,000 sessions, ``messages / 5``
threads over 90 days (a tenth escalated, about a third resolved) and five messages per thread
(user, bot, user, bot, then a human's reply in escalated threads or a user message), bot replies
with model, tokens and LLM latency, 5 % offline, 1 % of user turns failed. Then it times each
function of ``conversations.analytics`` (each one SQL statement, ``first_human_response`` raw SQL)
for one agent over 30 days, and for every agent over all 90 days (every row), best of three runs,
and prints the times. The database is dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")

BENCH_DB = "agentflow_analytics_bench"
FIRST_DAY = date(2026, 1, 1)
DAYS = 90

SEED_SQL = [
    "SELECT setseed(0.42)",
    """INSERT INTO conversations_agent (name, config, sources, fingerprint, version, code_parts, origin,
                                        created_at, updated_at)
       VALUES ('support', '{}', '{}', '', 1, '{}', '', now(), now()),
              ('shop', '{}', '{}', '', 1, '{}', '', now(), now())""",
    """INSERT INTO conversations_enduser (agent_id, external_id, display_name, metadata, created_at)
       SELECT CASE WHEN g % 4 = 0 THEN (SELECT id FROM conversations_agent WHERE name = 'shop')
                   ELSE (SELECT id FROM conversations_agent WHERE name = 'support') END,
              'bench-' || g, '', '{}', now()
         FROM generate_series(1, 20000) g""",
    """CREATE TEMP TABLE bench_users AS
       SELECT id, row_number() OVER (ORDER BY id) AS rn FROM conversations_enduser""",
    """INSERT INTO conversations_chatsession (id, user_id, status, ttl_seconds, started_at, last_activity_at,
                                              expires_at)
       SELECT gen_random_uuid(), u.id, 'expired', 3600, now(), now(), now()
         FROM generate_series(1, 50000) g JOIN bench_users u ON u.rn = 1 + g % 20000""",
    """CREATE TEMP TABLE bench_sessions AS
       SELECT id, user_id, row_number() OVER (ORDER BY id) AS rn FROM conversations_chatsession""",
    """INSERT INTO conversations_thread (id, user_id, session_id, status, topic, intent, topic_weight, vocabulary,
                                         last_assistant_text, escalated, opened_at, last_activity_at, resolution)
       SELECT gen_random_uuid(), s.user_id, s.id,
              CASE WHEN r.x < 0.35 THEN 'resolved' WHEN r.x < 0.6 THEN 'dormant' ELSE 'open' END,
              'Topic number ' || (1 + (g * 7919) % 300),
              (ARRAY['QUERY', 'OUTAGE', 'BILLING', 'ESCALATION', 'ACCOUNT'])[1 + g % 5],
              2, '[]', '', r.y < 0.1,
              {first}::timestamptz + (g::float / {threads}) * interval '{days} days',
              {first}::timestamptz + (g::float / {threads}) * interval '{days} days' + interval '10 minutes',
              ''
         FROM generate_series(1, {threads}) g
         JOIN bench_sessions s ON s.rn = 1 + g % 50000
        CROSS JOIN LATERAL (SELECT random() + g * 0 AS x, random() + g * 0 AS y) r""",
    """INSERT INTO conversations_message (id, user_id, session_id, thread_id, role, content, status,
                                          client_message_id, thread_event, thread_signals, intent, confidence,
                                          intent_candidates, escalated, offline, model, usage, latency_ms,
                                          llm_latency_ms, handled_by, memories_used, tool_calls, error, created_at)
       SELECT gen_random_uuid(), t.user_id, t.session_id, t.id,
              CASE WHEN n IN (2, 4) THEN 'assistant' WHEN n = 5 AND t.escalated THEN 'human_agent' ELSE 'user' END,
              'bench message',
              CASE WHEN n IN (1, 3, 5) AND NOT t.escalated AND r.x < 0.01 THEN 'failed' ELSE 'done' END,
              '', '', '{}',
              CASE WHEN n IN (2, 4) OR (n = 5 AND t.escalated) THEN '' ELSE t.intent END,
              CASE WHEN n IN (2, 4) OR (n = 5 AND t.escalated) THEN NULL ELSE 0.5 + r.x / 2 END,
              '[]', false,
              n IN (2, 4) AND r.x < 0.05,
              CASE WHEN n NOT IN (2, 4) THEN '' WHEN r.x < 0.05 THEN 'offline'
                   WHEN r.x < 0.8 THEN 'claude-sonnet-5-5' ELSE 'claude-haiku-5-5' END,
              CASE WHEN n IN (2, 4) AND r.x >= 0.05
                   THEN jsonb_build_object('input_tokens', 500 + (r.y * 3000)::int,
                                           'output_tokens', 50 + (r.y * 400)::int)
                   ELSE '{}'::jsonb END,
              NULL,
              CASE WHEN n IN (2, 4) AND r.x >= 0.05 THEN 300 + r.y * r.y * 4000 END,
              '', '[]', '[]', '',
              t.opened_at + CASE WHEN n = 5 AND t.escalated THEN interval '3 minutes' + r.y * interval '2 hours'
                                 ELSE n * interval '1 minute' END
         FROM conversations_thread t
        CROSS JOIN generate_series(1, 5) n
        CROSS JOIN LATERAL (SELECT random() + n * 0 AS x, random() + n * 0 AS y) r""",
    """INSERT INTO conversations_escalation (thread_id, user_id, reason, status, created_at, claimed_at,
                                             resolved_at)
       SELECT t.id, t.user_id,
              (ARRAY['low confidence', 'ESCALATION intent', 'offline: the LLM is unavailable',
                     'user asked for a human', 'handler asked for a human'])[1 + (abs(hashtext(t.id::text)) % 5)],
              CASE WHEN t.status = 'resolved' THEN 'resolved' ELSE 'open' END,
              t.opened_at + interval '3 minutes', NULL, NULL
         FROM conversations_thread t WHERE t.escalated""",
    "VACUUM ANALYZE",  # the visibility map: the dashboard's index-only scans
]


def _use_database(name: str) -> None:
    from django.conf import settings
    from django.db import connections

    connections.close_all()
    # The connection pool (one per alias, kept by the backend class) still points at the old database.
    close_pool = getattr(connections["default"], "close_pool", None)
    if close_pool is not None:
        close_pool()
    settings.DATABASES["default"]["NAME"] = name
    connections.settings["default"]["NAME"] = name
    del connections["default"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000, help="messages to seed (a multiple of 5)")
    parser.add_argument("--keep", action="store_true", help="keep the bench database afterwards")
    parser.add_argument("--reuse", action="store_true", help="reuse a kept bench database (no seeding)")
    args = parser.parse_args()
    if args.messages < 5 or args.messages % 5:
        parser.error("--messages must be a positive multiple of 5")

    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection

    from conversations import analytics
    from conversations.models import Agent, Message

    original = connection.settings_dict["NAME"]
    if not args.reuse:
        with connection.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')
            cursor.execute(f'CREATE DATABASE "{BENCH_DB}"')
    _use_database(BENCH_DB)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT current_database()")
            if cursor.fetchone()[0] != BENCH_DB:
                raise SystemExit("could not switch to the bench database; nothing was written")
        if not args.reuse:
            started = time.perf_counter()
            call_command("migrate", verbosity=0)
            print(f"migrated in {time.perf_counter() - started:.1f} s")
            started = time.perf_counter()
            params = {"first": f"'{FIRST_DAY.isoformat()}'", "threads": args.messages // 5, "days": DAYS}
            with connection.cursor() as cursor:
                for statement in SEED_SQL:
                    for key, value in params.items():
                        statement = statement.replace("{" + key + "}", str(value))
                    cursor.execute(statement)
            print(f"seeded in {time.perf_counter() - started:.1f} s")
        print(
            f"rows: {Message.objects.count():,} messages, {analytics.Thread.objects.count():,} threads,"
            f" {analytics.Escalation.objects.count():,} escalations"
        )
        print(f"load average at start: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
        support = Agent.objects.get(name="support")
        scopes = {
            "support, 30 days": analytics.Scope(
                agent=support, start=FIRST_DAY + timedelta(days=30), end=FIRST_DAY + timedelta(days=59)
            ),
            "all agents, 90 days (every row)": analytics.Scope(
                agent=None, start=FIRST_DAY, end=FIRST_DAY + timedelta(days=DAYS - 1)
            ),
        }
        figures = [
            analytics.activity_per_day,
            analytics.intent_mix,
            analytics.outcomes,
            analytics.escalation_reasons,
            analytics.first_human_response,
            analytics.llm_latency,
            analytics.tokens_and_cost,
            analytics.unresolved_topics,
        ]
        for label, scope in scopes.items():
            print(f"\n{label}: best of 3 runs, ms")
            total = 0.0
            for figure in figures:
                best = float("inf")
                for _ in range(3):
                    with analytics.analytics_session():  # as analytics_report runs them
                        started = time.perf_counter()
                        figure(scope)
                        best = min(best, time.perf_counter() - started)
                total += best
                print(f"  {figure.__name__:<22} {best * 1000:8.1f}")
            print(f"  {'whole report':<22} {total * 1000:8.1f}")
    finally:
        _use_database(original)
        if not args.keep:
            with connection.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)')


if __name__ == "__main__":
    main()
