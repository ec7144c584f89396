"""SQL statements and transactions per turn stage; the web process's memory after one REST message.

    python bench/turn_sql.py [--rounds 1] [--show] [--demo-categories]   # statements per stage
    python bench/turn_sql.py --rss   # web server RSS at start / after one message

Statements: the default agent, offline (no ``ANTHROPIC_API_KEY``), warmed up by one conversation,
runs ``turn_overhead.MESSAGES`` for a fresh user, stage by stage in this one thread: ``accept``
(store the user message), ``prepare`` (claim, thread and intent placement, history, memory lookup),
the agent's ``respond`` and ``finish`` (store the reply). Each stage's statements go through
``connection.execute_wrapper``; transactions are the outermost ``transaction.atomic`` blocks that
committed or rolled back, plus the statements run in autocommit (each its own transaction).
``--show`` prints the statements of the first user's turns.

RSS: starts daphne and a Celery worker (threads pool) on a free port with a queue of their own,
posts one message to ``/api/users/bench-rss/messages`` and reads the web process's ``VmRSS``
right after start and after the response.

Also runs on the code before the agent-runtime rework (``agentflow.defaults.get_agent``;
``pipeline.accept`` returning a tuple). Uses the configured database and Redis; its rows belong to
users named bench-*, deleted at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ["ANTHROPIC_API_KEY"] = ""  # offline mode, whatever .env says
os.environ["AGENT_RATE_LIMIT_MESSAGES_PER_MINUTE"] = "0"  # the bench sends faster than a person
os.environ.setdefault("AGENTFLOW_RATE_API_KEY_PER_MINUTE", "0")
os.environ.setdefault("AGENTFLOW_RATE_IP_PER_MINUTE", "0")
# Follow-up jobs queued on commit go to a queue of this run (purged at the end), not a shared worker's;
# channel groups and cache keys are this checkout's own (another checkout may share the Redis server).
os.environ.setdefault("AGENTFLOW_CELERY_QUEUE", f"bench-sql-{os.getpid()}")
os.environ.setdefault("AGENTFLOW_CHANNELS_PREFIX", f"bench-{ROOT.name}")
os.environ.setdefault("AGENTFLOW_CACHE_PREFIX", f"bench-{ROOT.name}")

from turn_overhead import MESSAGES  # noqa: E402

STAGES = ("accept", "prepare", "respond", "finish")


@dataclass
class Tally:
    """What one stage ran: statements (by kind), committed/rolled-back atomic blocks, autocommits."""

    statements: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    atomic: int = 0
    autocommit: int = 0
    sql: list[str] = field(default_factory=list)

    @property
    def transactions(self) -> int:
        return self.atomic + self.autocommit


@contextmanager
def counting(tally: Tally) -> Iterator[None]:
    """Count this thread's statements and transactions on the default connection into ``tally``."""
    from django.db import connections

    conn = connections["default"]
    conn.ensure_connection()
    commit, rollback = conn.commit, conn.rollback

    def wrapper(execute: Callable[..., Any], sql: str, params: Any, many: bool, context: Any) -> Any:
        tally.statements += 1
        tally.kinds[sql.lstrip("( ").split(None, 1)[0].upper()] += 1
        tally.sql.append(sql)
        if not conn.in_atomic_block:
            tally.autocommit += 1
        return execute(sql, params, many, context)

    def ended(original: Callable[[], None]) -> Callable[[], None]:
        def end() -> None:
            tally.atomic += 1
            original()

        return end

    conn.commit, conn.rollback = ended(commit), ended(rollback)  # type: ignore[method-assign]
    try:
        with conn.execute_wrapper(wrapper):
            yield
    finally:
        del conn.commit, conn.rollback  # back to the class's methods


def default_agent(demo_categories: bool) -> Any:
    """The default agent, or (``demo_categories``) one built by a script with the demo's intent categories.

    The default agent classifies against the categories its database holds; the demo's make two
    checkouts' databases comparable (they are written at build, once per database).
    """
    if demo_categories:
        from agentflow import AgentFrameworkBuilder
        from agentflow.management.commands.agentflow_demo import DEMO_CATEGORIES

        return AgentFrameworkBuilder().with_intent_categories(DEMO_CATEGORIES).build_sync(None)
    try:
        from agentflow.registry import default_agent as load
    except ImportError:  # before the agent-runtime rework
        from agentflow.defaults import get_agent as load
    return load()


def stored_message(received: Any) -> Any:
    """The stored user message ``pipeline.accept`` returns (a ``Received``; a tuple before the rework)."""
    return received.message if hasattr(received, "message") else received[0]


def one_turn(agent: Any, user_id: str, text: str, tallies: dict[str, Tally] | None) -> None:
    from asgiref.sync import async_to_sync

    from agentflow import pipeline

    def stage(name: str) -> Any:
        return counting(tallies.setdefault(name, Tally())) if tallies is not None else _nothing()

    with stage("accept"):
        message = stored_message(pipeline.accept(agent, user_id=user_id, message=text))
    with stage("prepare"):
        prepared = pipeline.prepare(agent, message_id=message.pk)
    if prepared.result is not None or prepared.judgement is not None:
        raise RuntimeError(f"turn of {text!r} did not prepare: {prepared}")
    with stage("respond"):  # async_to_sync: its database calls, if any, run in this thread
        outcome = async_to_sync(agent.respond)(prepared)
    with stage("finish"):
        pipeline.finish(agent, prepared, outcome)


@contextmanager
def _nothing() -> Iterator[None]:
    yield


def statements(rounds: int, show: bool, demo_categories: bool) -> None:
    from celery import current_app

    from intents.models import IntentCategory

    agent = default_agent(demo_categories)
    if not getattr(agent, "offline", True):
        raise SystemExit("the agent is not offline: unset ANTHROPIC_API_KEY")
    warmup = f"bench-warmup-{uuid.uuid4().hex[:6]}"
    for text in MESSAGES:  # warm up: model, classifier, caches, the agent record
        one_turn(agent, warmup, text, None)
    per_turn: list[dict[str, Tally]] = []
    try:
        for _ in range(rounds):
            user = f"bench-{uuid.uuid4().hex[:8]}"
            for text in MESSAGES:
                tallies: dict[str, Tally] = {}
                one_turn(agent, user, text, tallies)
                per_turn.append(tallies)
    finally:
        current_app.control.purge()  # the follow-up jobs the turns queued on this run's queue
    turns = len(per_turn)
    rows = IntentCategory.objects.filter(active=True)
    if getattr(agent, "record_id", None) is not None:  # categories belong to an agent after the rework
        rows = rows.filter(agent_id=agent.record_id)
    categories = rows.count()
    print(
        f"agent {getattr(agent, 'name', 'default')}, offline, {categories} active intent categories;"
        f" {turns} turns ({rounds} fresh user(s) x {len(MESSAGES)} messages), per turn:"
    )
    print_stages(per_turn, turns)
    later = [t for n, t in enumerate(per_turn) if n % len(MESSAGES)]  # not a user's first message
    print(f"of which a returning user's ({len(later)} turns: not the user's first message), per turn:")
    print_stages(later, len(later))
    if show:
        for n, tallies in enumerate(per_turn[: len(MESSAGES)], 1):
            for name in STAGES:
                print(f"--- turn {n} {name}")
                for sql in tallies[name].sql:
                    print("   ", " ".join(sql.split())[:160])


def print_stages(per_turn: list[dict[str, Tally]], turns: int) -> None:
    totals = Tally()
    for name in STAGES:
        merged = Tally()
        for tallies in per_turn:
            t = tallies[name]
            merged.statements += t.statements
            merged.kinds.update(t.kinds)
            merged.atomic += t.atomic
            merged.autocommit += t.autocommit
        totals.statements += merged.statements
        totals.kinds.update(merged.kinds)
        totals.atomic += merged.atomic
        totals.autocommit += merged.autocommit
        print_line(name, merged, turns)
    print_line("total", totals, turns)


def print_line(name: str, t: Tally, turns: int) -> None:
    kinds = " ".join(f"{k}={v / turns:.1f}" for k, v in sorted(t.kinds.items()))
    print(
        f"{name:<8} statements={t.statements / turns:5.1f}  transactions={t.transactions / turns:4.1f}"
        f" (atomic={t.atomic / turns:.1f} autocommit={t.autocommit / turns:.1f})  [{kinds}]"
    )


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for process {pid}")


def model_mapped(pid: int) -> bool:
    """Whether the process has onnxruntime's library mapped (it loaded the embedding model)."""
    return "onnxruntime" in Path(f"/proc/{pid}/maps").read_text()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def web_rss() -> None:
    from agentflow_project import runtime
    from conversations.models import ApiKey
    from conversations.services import api_key_create

    port = free_port()
    queue = f"bench-rss-{port}"
    env = {**os.environ, "AGENTFLOW_CELERY_QUEUE": queue, "AGENTFLOW_WORKER_CONCURRENCY": "2"}
    logs = ROOT / ".data" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    web = subprocess.Popen(
        runtime.web_command(port=port),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(logs / "rss-web.log", "w"),
    )
    worker = subprocess.Popen(
        runtime.worker_command(concurrency=2, queue=queue, loglevel="WARNING"),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(logs / "rss-worker.log", "w"),
    )
    key, plain = api_key_create(name=f"bench-rss-{uuid.uuid4().hex[:8]}")
    try:
        base = f"http://127.0.0.1:{port}"
        runtime.wait_for_http(base + "/api/health/live", what=f"the web server (see {logs})")
        started_kib = rss_kib(web.pid)
        request = urllib.request.Request(
            f"{base}/api/users/bench-rss/messages",
            data=json.dumps({"message": MESSAGES[0]}).encode(),
            headers={"Content-Type": "application/json", "X-API-Key": plain},
            method="POST",
        )
        began = time.perf_counter()
        with urllib.request.urlopen(request, timeout=120) as response:
            body = json.loads(response.read())
        took = (time.perf_counter() - began) * 1000
        after_kib = rss_kib(web.pid)
        worker_kib = rss_kib(worker.pid)
        print(f"web RSS after start        {started_kib / 1024:7.1f} MiB  (pid {web.pid})")
        print(
            f"web RSS after one message  {after_kib / 1024:7.1f} MiB  (+{(after_kib - started_kib) / 1024:.1f};"
            f" status {body.get('status')}, offline {body.get('offline')}, {took:.0f} ms)"
        )
        print(f"worker RSS after it        {worker_kib / 1024:7.1f} MiB")
        for name, pid in (("web", web.pid), ("worker", worker.pid)):
            print(f"onnxruntime (the embedding model) mapped in the {name} process: {model_mapped(pid)}")
    finally:
        for p in (web, worker):
            p.terminate()
        for p in (web, worker):
            p.wait(timeout=30)
        ApiKey.objects.filter(pk=key.pk).delete()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=1, help="fresh users, each sending all MESSAGES")
    parser.add_argument("--show", action="store_true", help="print the statements of the first user's turns")
    parser.add_argument(
        "--demo-categories", action="store_true", help="a script's agent with the demo's intent categories"
    )
    parser.add_argument("--rss", action="store_true", help="measure the web process's RSS instead")
    args = parser.parse_args()

    import django

    django.setup()
    from django.core.management import call_command

    from conversations.models import EndUser

    call_command("migrate", verbosity=0)
    try:
        if args.rss:
            web_rss()
        else:
            statements(args.rounds, args.show, args.demo_categories)
    finally:
        EndUser.objects.filter(external_id__startswith="bench-").delete()


if __name__ == "__main__":
    main()
