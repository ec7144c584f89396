"""The web process's CPU per REST request and per statement, in-process (no daphne, no worker).

Two parts, both on the configured database (embedded by default) and a Valkey of the bench's own:

* ``requests``: the project's ASGI application (``agentflow_project.asgi``) driven directly with
  ``POST /api/users/{id}/messages`` (``wait_seconds`` 0: no wait for the worker; the turns are queued
  and never run), --users users, --posts posts in all (one in --posts/--users opens a session);
  prints the process's CPU ms per post and the garbage collector's passes per generation with their
  CPU (``gc.callbacks``).
* ``statements``: each statement the web process runs per message or per connection, in its ORM
  form and in the compiled form the services use (``agentflow.prepared``), alternated over --rounds
  rounds of --calls calls; prints the median CPU ms a call of each.

    python bench/web_cpu.py [requests|statements|both] [--posts 600] [--users 200] [--rounds 6] [--calls 200]

Its users are named <tag>-*; the audit rows the statements part writes stay (the table is append-only).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
TAG = f"webcpu-{uuid.uuid4().hex[:6]}"

import stack  # noqa: E402

stack.production_settings()
os.environ["AGENTFLOW_BACKGROUND_JOBS"] = "false"
for name in ("AGENTFLOW_CELERY_QUEUE", "AGENTFLOW_CHANNELS_PREFIX", "AGENTFLOW_CACHE_PREFIX"):
    os.environ[name] = TAG  # the queued turns go to a queue no worker reads


async def _post(application: Any, key: str, user: str, text: str) -> int:
    body = json.dumps({"message": text, "wait_seconds": 0}).encode()
    path = f"/api/users/{user}/messages"
    events = [{"type": "http.request", "body": body, "more_body": False}]
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if events:
            return events.pop(0)
        await asyncio.sleep(3600)  # the client never goes away
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    headers = [
        (b"host", b"127.0.0.1"),
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        (b"x-api-key", key.encode()),
    ]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    await application(scope, receive, send)
    return int(sent[0]["status"])


def requests_part(posts: int, users: int) -> None:
    from conversations.services import api_key_create

    _, key = api_key_create(name=TAG)
    from agentflow_project.asgi import application

    passes = {generation: [0, 0.0] for generation in range(3)}
    began = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            began[0] = time.thread_time()
        else:
            entry = passes[info["generation"]]
            entry[0] += 1
            entry[1] += time.thread_time() - began[0]

    async def run() -> None:
        for i in range(20):  # warm up: threads, connections, compiled statements
            assert await _post(application, key, f"{TAG}-warm{i}", "hello there") in (200, 202)
        gc.callbacks.append(on_gc)
        cpu = time.process_time()
        for i in range(posts):
            status = await _post(application, key, f"{TAG}-{i % users}", f"my order {i} is late")
            assert status in (200, 202), status
        cpu = time.process_time() - cpu
        gc.callbacks.remove(on_gc)
        print(f"requests: {cpu / posts * 1000:.2f} ms CPU per post ({posts} posts, {users} users)")
        for generation, (count, seconds) in passes.items():
            print(f"  gc generation {generation}: {count} passes, {seconds * 1000:.1f} ms CPU")
        print(f"  objects the collector tracks now: {len(gc.get_objects()):,}")

    asyncio.run(run())


def statements_part(rounds: int, calls: int) -> None:
    from django.utils import timezone

    from agentflow import prepared
    from agentflow.conf import conf
    from conversations import services
    from conversations.agents import agent_settings
    from conversations.models import AuditEvent, ChatSession, EndUser

    agent = agent_settings(name=conf().DEFAULT_AGENT)
    users = [services.user_get_or_create(agent_id=agent.id, external_id=f"{TAG}-s{i}") for i in range(50)]
    now = timezone.now()
    audit = {"actor_kind": "system", "action": "api_call", "route": "POST /bench", "subject": TAG}

    def user_orm(i: int) -> None:
        EndUser.objects.get_or_create(agent_id=agent.id, external_id=f"{TAG}-s{i % 50}")

    def user_compiled(i: int) -> None:
        services.user_get_or_create(agent_id=agent.id, external_id=f"{TAG}-s{i % 50}")

    def live_orm(i: int) -> None:
        sessions = ChatSession.objects.filter(user=users[i % 50], status="active", expires_at__gt=now)
        sessions.order_by("-last_activity_at").first()

    def live_compiled(i: int) -> None:
        services._USER_LIVE_SESSION.run(user_id=users[i % 50].pk, now=now)

    def seen_orm(i: int) -> None:
        EndUser.objects.filter(pk=users[i % 50].pk).update(last_seen_at=now)

    def seen_compiled(i: int) -> None:
        user = users[i % 50]
        user.last_seen_at = now
        prepared.save_fields(user, ["last_seen_at"])

    def audit_orm(i: int) -> None:
        AuditEvent.objects.create(**audit)

    def audit_compiled(i: int) -> None:
        prepared.create(AuditEvent, **audit)

    pairs = {
        "end user read": (user_orm, user_compiled),
        "live session read": (live_orm, live_compiled),
        "last_seen_at update": (seen_orm, seen_compiled),
        "audit row insert": (audit_orm, audit_compiled),
    }
    print(f"statements: CPU ms a call, medians of {rounds} alternated rounds of {calls} calls")
    for name, (orm, compiled) in pairs.items():
        for call in (orm, compiled):
            for i in range(20):
                call(i)
        spent: dict[str, list[float]] = {"orm": [], "compiled": []}
        for r in range(rounds):
            order = [("orm", orm), ("compiled", compiled)]
            for label, call in order if r % 2 == 0 else order[::-1]:
                cpu = time.thread_time()
                for i in range(calls):
                    call(i)
                spent[label].append((time.thread_time() - cpu) / calls * 1000)
        print(
            f"  {name:20s} ORM {statistics.median(spent['orm']):.3f}"
            f"  compiled {statistics.median(spent['compiled']):.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("part", nargs="?", choices=["requests", "statements", "both"], default="both")
    parser.add_argument("--posts", type=int, default=600)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--calls", type=int, default=200)
    args = parser.parse_args()
    if min(args.posts, args.users, args.rounds, args.calls) < 1:
        parser.error("--posts, --users, --rounds and --calls must be at least 1")
    valkey = stack.OwnValkey()
    os.environ["REDIS_URL"] = valkey.start()
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        if args.part in ("requests", "both"):
            requests_part(args.posts, args.users)
        if args.part in ("statements", "both"):
            statements_part(args.rounds, args.calls)
    finally:
        from conversations.models import EndUser

        EndUser.objects.filter(external_id__startswith=TAG).delete()
        valkey.stop()


if __name__ == "__main__":
    main()
