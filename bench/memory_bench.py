"""Memory at scale: insert throughput, per-user top-10 retrieval latency and recall, turn overhead.

    nice -n 10 python bench/memory_bench.py [--rows 100000] [--users 10000] [--queries 500]
    nice -n 10 python bench/memory_bench.py --rows 1000000        # the 1M case (minutes; not for CI)

Runs in its own database, ``agentflow_bench``, on the server of ``settings.DATABASES`` (created
afresh, migrated, dropped at the end unless ``--keep``). Prints:

- insert throughput of the real write path (``memory_remember``: embedding, de-duplication, eviction)
  and of a bulk ``COPY`` (binary vectors);
- per-user top-10 retrieval through ``memory_search`` (the function turns use): p50/p95 latency, and
  recall@10 against the same search with index scans switched off (an exact sequential scan);
- with ``--plain-hnsw``: the alternative design (one HNSW index over all rows, filtered by user) for
  comparison;
- turn overhead with memory on vs off (the in-process path of ``bench/turn_overhead.py``, the fake
  LLM on loopback): memory lookups against the loaded table, memory writes queued to Celery.

The scale data are random unit vectors (384 dimensions): ``rows`` memories, 1 % of them global
(a tenth of those waiting for review), the rest spread evenly over ``users`` users.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ["AGENT_RATE_LIMIT_MESSAGES_PER_MINUTE"] = "0"
# Memory jobs queued by the turns go to a queue of their own (no worker of the product takes them).
QUEUE = f"bench-memory-{os.getpid()}"
os.environ["AGENTFLOW_CELERY_QUEUE"] = QUEUE
os.environ["AGENTFLOW_DB_POOL_MAX"] = "1"  # plain connections: the bench switches databases

BENCH_DB = "agentflow_bench"
DIM = 384
TOP_K = 10


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def unit_vectors(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.standard_normal((n, DIM), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def admin_execute(settings_dict: dict, sql: str) -> None:
    import psycopg

    with psycopg.connect(
        dbname="postgres",
        user=settings_dict["USER"],
        password=settings_dict["PASSWORD"] or None,
        host=settings_dict["HOST"] or None,
        port=settings_dict["PORT"] or None,
        autocommit=True,
    ) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
            "pg_backend_pid()",
            [BENCH_DB],
        )
        conn.execute(sql)


def use_bench_database() -> dict:
    from django.db import connections

    default = connections["default"]
    default.close()
    original = dict(default.settings_dict)
    admin_execute(original, f"DROP DATABASE IF EXISTS {BENCH_DB}")
    admin_execute(original, f"CREATE DATABASE {BENCH_DB}")
    default.settings_dict["NAME"] = BENCH_DB
    return original


def bench_agent() -> Any:
    """The agent the bench's users and memories belong to (its own, so nothing else is measured)."""
    from conversations.models import Agent

    return Agent.objects.get_or_create(name="bench-memory")[0]


def insert_real_path(n: int) -> float:
    """Rows/s through memory_remember with the real embedder (distinct texts, 20 users)."""
    from agentflow.embeddings import get_embedder
    from conversations.models import EndUser
    from memory.services import memory_remember

    embedder = get_embedder()
    embedder.embed_one("warm up")
    agent = bench_agent()
    users = [EndUser.objects.create(agent=agent, external_id=f"real-{i}") for i in range(20)]
    products = [
        "invoice",
        "password",
        "S3 backup",
        "API key",
        "webhook",
        "SSO login",
        "export",
        "team seat",
        "refund",
        "mobile app",
        "2FA",
        "billing plan",
        "data import",
        "search index",
        "email digest",
    ]
    started = time.perf_counter()
    for i in range(n):
        a, b = products[i % len(products)], products[(i * 7 + 3) % len(products)]
        memory_remember(
            user=users[i % len(users)],
            kind="episodic",
            content=f"Problem: case {i}: the {a} fails after changing the {b}. What helped: step {i % 13} of the "
            f"{b} guide. Outcome: solved on attempt {i % 5 + 1}.",
            embedder=embedder,
            source={"bench": i},
            max_per_user=100,
        )
    return n / (time.perf_counter() - started)


def bulk_load(rows: int, users: int, seed: int) -> tuple[float, list[int]]:
    """COPY ``rows`` memories (1 % global) in binary; returns (rows/s, the users' pks)."""
    from django.db import connection
    from django.utils import timezone
    from pgvector.psycopg import register_vector

    from conversations.models import EndUser

    agent = bench_agent()
    EndUser.objects.bulk_create(
        [EndUser(agent=agent, external_id=f"bench-user-{i:05d}") for i in range(users)], batch_size=5000
    )
    user_pks = list(
        EndUser.objects.filter(external_id__startswith="bench-user-")
        .order_by("pk")
        .values_list("pk", flat=True)
    )
    rng = np.random.default_rng(seed)
    n_global = max(1, rows // 100)
    now = timezone.now()
    connection.ensure_connection()
    conn = connection.connection
    register_vector(conn)
    started = time.perf_counter()
    with conn.cursor() as cursor:
        with cursor.copy(
            "COPY memory_memory (id, agent_id, user_id, kind, content, embedding, embedding_model, source, "
            "approved, use_count, created_at, updated_at) FROM STDIN (FORMAT BINARY)"
        ) as copy:
            copy.set_types(
                [
                    "uuid",
                    "int8",
                    "int8",
                    "varchar",
                    "text",
                    "vector",
                    "varchar",
                    "jsonb",
                    "bool",
                    "int4",
                    "timestamptz",
                    "timestamptz",
                ]
            )
            done = 0
            while done < rows:
                chunk = min(20_000, rows - done)
                vectors = unit_vectors(rng, chunk)
                for j in range(chunk):
                    i = done + j
                    if i < n_global:
                        user, kind, approved = None, "pattern", i % 10 != 0
                    else:
                        user, kind, approved = user_pks[i % users], "episodic", True
                    copy.write_row(
                        (
                            uuid.uuid4(),
                            agent.pk,
                            user,
                            kind,
                            f"synthetic memory {i}",
                            vectors[j],
                            "random",
                            "{}",
                            approved,
                            0,
                            now,
                            now,
                        )
                    )
                done += chunk
    conn.commit()
    rate = rows / (time.perf_counter() - started)
    with conn.cursor() as cursor:
        cursor.execute("VACUUM ANALYZE memory_memory")
    return rate, user_pks


def retrieval(
    user_pks: list[int], queries: int, exact_queries: int, seed: int
) -> tuple[list[float], float, list[int]]:
    """p50/p95 of memory_search for random users and queries; recall@10 against an exact scan."""
    from django.db import connection, transaction

    from conversations.models import EndUser
    from memory.selectors import memory_search

    rng = np.random.default_rng(seed + 1)
    picks = rng.choice(len(user_pks), size=queries)
    vectors = unit_vectors(rng, queries)
    users = {u.pk: u for u in EndUser.objects.filter(pk__in=[user_pks[i] for i in picks])}

    def search(i: int) -> list[str]:
        found = memory_search(
            user=users[user_pks[picks[i]]], embedding=vectors[i], limit=TOP_K, similarity_threshold=0.0
        )
        return [m["id"] for m in found]

    for i in range(min(50, queries)):  # warm the caches
        search(i)
    latencies, results = [], []
    for i in range(queries):
        started = time.perf_counter()
        results.append(search(i))
        latencies.append((time.perf_counter() - started) * 1000)
    hits = total = 0
    sizes = []
    for i in range(min(exact_queries, queries)):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                "SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off; "
                "SET LOCAL enable_indexonlyscan = off"
            )
            exact = search(i)
        hits += len(set(exact) & set(results[i]))
        total += len(exact)
        sizes.append(len(results[i]))
    return latencies, hits / total if total else 1.0, sizes


def plain_hnsw(user_pks: list[int], queries: int, seed: int) -> tuple[list[float], float]:
    """The previous design, for comparison: one HNSW index over every row and one query for the
    user's and the global memories (``WHERE user_id = %s OR user_id IS NULL``), iterative scan on."""
    from django.db import connection

    from memory.selectors import GLOBAL_EF_SEARCH

    rng = np.random.default_rng(seed + 2)
    picks = rng.choice(len(user_pks), size=queries)
    vectors = unit_vectors(rng, queries)
    sql = (
        "SELECT id FROM memory_memory WHERE user_id = %s OR (user_id IS NULL AND approved) "
        "ORDER BY embedding <=> %s::vector LIMIT %s"
    )
    with connection.cursor() as cursor:
        cursor.execute(f"SET hnsw.ef_search = {int(GLOBAL_EF_SEARCH)}")
        cursor.execute("SET maintenance_work_mem = '2GB'")  # the graph fits: a build without spilling
        cursor.execute(
            "CREATE INDEX bench_all_hnsw ON memory_memory USING hnsw (embedding vector_cosine_ops) "
            "WITH (m = 16, ef_construction = 64)"
        )
        latencies, hits, total = [], 0, 0
        for i in range(queries):
            args = [user_pks[picks[i]], "[" + ",".join(f"{x:.6f}" for x in vectors[i]) + "]", TOP_K]
            started = time.perf_counter()
            cursor.execute(sql, args)
            found = {r[0] for r in cursor.fetchall()}
            latencies.append((time.perf_counter() - started) * 1000)
            cursor.execute("BEGIN; SET LOCAL enable_indexscan = off; SET LOCAL enable_bitmapscan = off")
            cursor.execute(sql, args)
            exact = {r[0] for r in cursor.fetchall()}
            cursor.execute("COMMIT")
            hits += len(found & exact)
            total += len(exact)
        cursor.execute("DROP INDEX bench_all_hnsw")
        cursor.execute("RESET hnsw.ef_search")
    return latencies, hits / total


def explain(user_pk: int) -> list[str]:
    """The plan of memory_search's query (memory_candidates), run once with EXPLAIN ANALYZE."""
    from django.db import connection, transaction

    from memory import selectors

    vector = unit_vectors(np.random.default_rng(7), 1)[0]
    agent_id = bench_agent().pk
    exact = selectors.approved_global_count(agent_id=agent_id) <= selectors.GLOBAL_EXACT_MAX
    query = selectors.memory_candidates(
        user_id=user_pk, agent_id=agent_id, embedding=vector, pool=3 * TOP_K, exact_globals=exact
    )
    sql, params = query.query.sql_with_params()
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT set_config('hnsw.ef_search', %s, true)", [str(selectors.GLOBAL_EF_SEARCH)])
        cursor.execute("EXPLAIN (ANALYZE, COSTS OFF) " + sql, params)
        return [r[0] for r in cursor.fetchall() if "Scan" in r[0] or "Execution" in r[0]]


SETTINGS = {"memory off": (False, False), "memory on, no writes": (True, False), "memory on": (True, True)}


async def turns(rounds: int, server_url: str) -> dict[str, list[float]]:
    """Interleaved 5-turn conversations with memory off, on without background jobs (reads only) and
    on (reads, and memory jobs queued to Celery); latency per turn (ms)."""
    from anthropic import AsyncAnthropic
    from django.conf import settings
    from turn_overhead import MESSAGES

    from agentflow import AgentFrameworkBuilder
    from agentflow.management.commands.agentflow_demo import DEMO_CATEGORIES

    client = AsyncAnthropic(api_key="bench-key", base_url=server_url)
    agents = {}
    for enabled in (True, False):
        agents[enabled] = (
            await AgentFrameworkBuilder()
            .with_intent_categories(DEMO_CATEGORIES)
            .with_config({"memory_config": {"enabled": enabled}})
            .build(client)
        )
        await agents[enabled].process_message(user_id=f"bench-warm-{uuid.uuid4().hex[:6]}", message="warm up")
    names = list(SETTINGS)
    latencies: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % 3 :] + names[: r % 3]:  # rotate the order: drift hits every setting alike
            enabled, jobs = SETTINGS[name]
            settings.AGENTFLOW = {**settings.AGENTFLOW, "BACKGROUND_JOBS": jobs}
            user = f"bench-turn-{uuid.uuid4().hex[:8]}"
            for text in MESSAGES:  # "Thanks, that fixed the login!" resolves the thread: a memory job
                started = time.perf_counter()
                await agents[enabled].process_message(user_id=user, message=text)
                latencies[name].append((time.perf_counter() - started) * 1000)
    return latencies


def queue_cost(n: int) -> list[float]:
    """What a memory write costs the turn that triggers it: one ``send_task`` to the broker (ms)."""
    from celery import current_app

    current_app.send_task("memory.remember_resolution", args=["00000000-0000-0000-0000-000000000000"])
    latencies = []
    for _ in range(n):
        started = time.perf_counter()
        current_app.send_task("memory.remember_resolution", args=["00000000-0000-0000-0000-000000000000"])
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def line(name: str, values: list[float], unit: str = "ms") -> str:
    return (
        f"{name:<44} n={len(values):<5} p50={pct(values, 50):7.2f} {unit}  p95={pct(values, 95):7.2f} {unit}"
        f"  mean={statistics.mean(values):7.2f} {unit}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument(
        "--exact-queries", type=int, default=100, help="queries checked against an exact scan"
    )
    parser.add_argument("--real-inserts", type=int, default=300, help="rows written through memory_remember")
    parser.add_argument("--turn-rounds", type=int, default=30, help="5-turn conversations per setting")
    parser.add_argument("--llm-latency", type=float, default=0.05, help="seconds the fake LLM waits")
    parser.add_argument("--plain-hnsw", action="store_true", help="also measure one HNSW index over all rows")
    parser.add_argument("--ef-search", type=int, help="override memory.selectors.GLOBAL_EF_SEARCH")
    parser.add_argument(
        "--global-exact-max",
        type=int,
        help="override memory.selectors.GLOBAL_EXACT_MAX (0: global memories always through HNSW)",
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep", action="store_true", help=f"keep the {BENCH_DB} database")
    args = parser.parse_args()
    if args.rows < 100 or args.users < 1 or args.queries < 1 or args.users > args.rows:
        parser.error("need --rows >= 100, 1 <= --users <= --rows, --queries >= 1")

    import django

    django.setup()
    import logging

    from django.core.management import call_command

    logging.getLogger("agentflow.turn").setLevel(logging.WARNING)  # one line per turn otherwise
    from memory import selectors

    if args.ef_search:
        selectors.GLOBAL_EF_SEARCH = args.ef_search
    if args.global_exact_max is not None:
        selectors.GLOBAL_EXACT_MAX = args.global_exact_max
    original = use_bench_database()
    try:
        call_command("migrate", verbosity=0)
        print(
            f"memory bench: {args.rows:,} rows, {args.users:,} users, {os.cpu_count()} CPUs, database {BENCH_DB},"
            f" hnsw.ef_search {selectors.GLOBAL_EF_SEARCH}, global memories exact up to {selectors.GLOBAL_EXACT_MAX:,}"
        )
        print(
            f"insert, real write path (memory_remember)    {insert_real_path(args.real_inserts):10,.0f} rows/s"
            f"  (n={args.real_inserts}, embedding + de-duplication + eviction)"
        )
        started = time.perf_counter()
        rate, user_pks = bulk_load(args.rows, args.users, args.seed)
        print(
            f"insert, bulk COPY (binary vectors)           {rate:10,.0f} rows/s"
            f"  (load + VACUUM ANALYZE {time.perf_counter() - started:.0f} s)"
        )
        globals_ = selectors.approved_global_count(
            agent_id=bench_agent().pk, max_age=0
        )  # the loaded data, not a count from before
        how = "exact scan" if globals_ <= selectors.GLOBAL_EXACT_MAX else "HNSW"
        print(f"approved global memories: {globals_:,} -> {how}; per-user memories: exact scan")
        latencies, recall, sizes = retrieval(user_pks, args.queries, args.exact_queries, args.seed)
        print(
            line(f"retrieval top-{TOP_K} per user, memory_search", latencies)
            + f"  recall@{TOP_K}={recall:.4f} (n={len(sizes)}, min results {min(sizes)})"
        )
        for plan_line in explain(user_pks[0]):
            print("  plan:", plan_line.strip())
        if args.plain_hnsw:
            started = time.perf_counter()
            plain, plain_recall = plain_hnsw(user_pks, min(args.queries, 200), args.seed)
            print(
                line("retrieval, previous design (one HNSW, user OR global)", plain)
                + f"  recall@{TOP_K}={plain_recall:.4f}  (index build + queries {time.perf_counter() - started:.0f} s)"
            )

        from agentflow.testing.fake_anthropic import FakeAnthropicServer

        server = FakeAnthropicServer()
        server.start()
        server.latency = args.llm_latency
        llm_ms = args.llm_latency * 1000
        try:
            measured = asyncio.run(turns(args.turn_rounds, server.base_url))
        finally:
            server.stop()
        overhead = {name: [v - llm_ms for v in values] for name, values in measured.items()}
        for name, values in overhead.items():
            print(line(f"turn overhead, {name}", values))
        off, reads, on = (overhead[name] for name in SETTINGS)
        print(
            f"turn overhead, memory reads (on, no writes - off) p50={pct(reads, 50) - pct(off, 50):+7.2f} ms"
            f"  mean={statistics.mean(reads) - statistics.mean(off):+7.2f} ms"
        )
        print(line("memory write on the hot path: one send_task", queue_cost(500)))
        print(
            f"turn overhead, memory writes (on - on, no writes) p50={pct(on, 50) - pct(reads, 50):+7.2f} ms"
            f"  mean={statistics.mean(on) - statistics.mean(reads):+7.2f} ms  (fake LLM {llm_ms:.0f} ms)"
        )
    finally:
        from django.db import connections

        connections.close_all()
        try:
            from agentflow_project.celery import app

            with app.connection_for_write() as conn:
                conn.default_channel.queue_delete(QUEUE)
        except Exception as exc:  # the queue holds only this run's leftovers
            print(f"could not delete queue {QUEUE}: {exc}")
        if not args.keep:
            admin_execute(original, f"DROP DATABASE IF EXISTS {BENCH_DB}")


if __name__ == "__main__":
    main()
