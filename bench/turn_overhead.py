"""Turn latency and framework overhead, in-process and through REST + Celery.

The LLM is the fake Messages API on loopback with a fixed latency, driven by the real anthropic SDK,
so overhead = turn latency - LLM latency is AgentFlow's own cost (session, thread decision with the
embedding, intent, memory lookup, storage; plus HTTP, queueing and the worker for the REST path).

    python bench/turn_overhead.py [--turns 200] [--llm-latency 0.2] [--rest-turns 100]

Prints p50/p95 of latency and overhead for each path. Uses the configured database (DATABASE_URL or
the embedded server) and Redis; its rows belong to users named bench-*, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ["AGENT_RATE_LIMIT_MESSAGES_PER_MINUTE"] = "0"  # the bench sends faster than a person
# One API key from one address: the per-key and per-IP REST limits would throttle the bench itself.
os.environ.setdefault("AGENTFLOW_RATE_API_KEY_PER_MINUTE", "0")
os.environ.setdefault("AGENTFLOW_RATE_IP_PER_MINUTE", "0")

MESSAGES = [
    "My login is broken, it says invalid password",
    "I already tried resetting it twice",
    "Actually, different question: how do I configure S3 backups?",
    "Which bucket region should I pick?",
    "Thanks, that fixed the login!",
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def report(name: str, latencies: list[float], llm_ms: float) -> None:
    overhead = [v - llm_ms for v in latencies]
    print(
        f"{name:<22} n={len(latencies):<4} latency p50={pct(latencies, 50):7.1f} ms  p95={pct(latencies, 95):7.1f} ms"
        f"   overhead p50={pct(overhead, 50):6.1f} ms  p95={pct(overhead, 95):6.1f} ms"
        f"  mean={statistics.mean(overhead):6.1f} ms"
    )


async def in_process(turns: int, server_url: str) -> list[float]:
    from anthropic import AsyncAnthropic

    from agentflow import AgentFrameworkBuilder
    from agentflow.management.commands.agentflow_demo import DEMO_CATEGORIES

    client = AsyncAnthropic(api_key="bench-key", base_url=server_url)
    agent = await AgentFrameworkBuilder().with_intent_categories(DEMO_CATEGORIES).build(client)
    await agent.process_message(user_id=f"bench-warmup-{uuid.uuid4().hex[:6]}", message="warm up")
    latencies = []
    users = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(max(1, turns // len(MESSAGES)))]
    for i in range(turns):
        user = users[(i // len(MESSAGES)) % len(users)]
        started = time.perf_counter()
        await agent.process_message(user_id=user, message=MESSAGES[i % len(MESSAGES)])
        latencies.append((time.perf_counter() - started) * 1000)
    return latencies


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def through_rest(turns: int, server_url: str, api_key: str) -> list[float]:
    from agentflow_project import runtime

    port = free_port()
    env = {
        **os.environ,
        "ANTHROPIC_API_KEY": "bench-key",
        "ANTHROPIC_BASE_URL": server_url,
        "AGENTFLOW_CELERY_QUEUE": f"bench-{port}",
    }
    logs = ROOT / ".data" / "bench"
    logs.mkdir(parents=True, exist_ok=True)
    procs = [
        subprocess.Popen(
            runtime.web_command(port=port),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(logs / "web.log", "w"),
        ),
        subprocess.Popen(
            runtime.worker_command(concurrency=8, queue=f"bench-{port}", loglevel="WARNING"),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=open(logs / "worker.log", "w"),
        ),
    ]
    print(f"server and worker logs: {logs}")
    try:
        base = f"http://127.0.0.1:{port}"
        runtime.wait_for_http(base + "/api/health/live")

        def post(user: str, text: str) -> dict:
            request = urllib.request.Request(
                f"{base}/api/users/{user}/messages",
                data=json.dumps({"message": text}).encode(),
                headers={"Content-Type": "application/json", "X-API-Key": api_key},
                method="POST",
            )
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())

        for _ in range(3):  # warm the worker (model load, first connections)
            post(f"bench-warmup-{uuid.uuid4().hex[:6]}", "warm up")
        latencies = []
        users = [f"bench-{uuid.uuid4().hex[:8]}" for _ in range(max(1, turns // len(MESSAGES)))]
        for i in range(turns):
            user = users[(i // len(MESSAGES)) % len(users)]
            started = time.perf_counter()
            body = post(user, MESSAGES[i % len(MESSAGES)])
            latencies.append((time.perf_counter() - started) * 1000)
            if body["status"] != "done":
                raise RuntimeError(f"turn not done: {body}")
        return latencies
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=200)
    parser.add_argument("--rest-turns", type=int, default=100)
    parser.add_argument("--llm-latency", type=float, default=0.2, help="seconds the fake LLM waits")
    args = parser.parse_args()

    import django

    django.setup()
    from django.core.management import call_command

    from agentflow.testing.fake_anthropic import FakeAnthropicServer
    from conversations.models import ApiKey, EndUser
    from conversations.services import api_key_create

    call_command("migrate", verbosity=0)
    server = FakeAnthropicServer()
    server.start()
    server.latency = args.llm_latency
    llm_ms = args.llm_latency * 1000
    print(f"fake LLM latency {llm_ms:.0f} ms; {os.cpu_count()} CPUs")
    try:
        report("in-process", asyncio.run(in_process(args.turns, server.base_url)), llm_ms)
        if args.rest_turns:
            key, plain = api_key_create(name=f"bench-{uuid.uuid4().hex[:8]}")
            try:
                report("REST + Celery", through_rest(args.rest_turns, server.base_url, plain), llm_ms)
            finally:
                ApiKey.objects.filter(pk=key.pk).delete()
    finally:
        server.stop()
        EndUser.objects.filter(external_id__startswith="bench-").delete()


if __name__ == "__main__":
    main()
