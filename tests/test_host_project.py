"""AgentFlow inside a Django project that is not ``agentflow_project``: ``examples/hostproject``.

The host project has its own settings, URLconf, ASGI application and Celery app; it installs the apps,
includes ``agentflow.web.urls`` and ``agentflow.web.routing``, and adds ``agentflow.worker``'s steps.
Here it runs as an operator would run it, in processes of its own: ``migrate`` against a fresh
database, a Celery worker and daphne; then one turn through REST and one through the WebSocket, with
the fake Messages API as the LLM.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import redis
import websockets

from agentflow.testing.fake_anthropic import FakeAnthropicServer, FakeReply
from tests.faults import unused_port

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
HOST = ROOT / "examples" / "hostproject"
STARTUP_SECONDS = 90


def _until(what: str, check: Callable[[], Any], *, seconds: float = STARTUP_SECONDS) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.3)
    pytest.fail(f"{what}: not within {seconds} s")


def _server_url(db: dict[str, Any], name: str) -> str:
    return f"postgresql://{db['USER']}:@/{name}?host={db['HOST']}"


@pytest.fixture
def host_env(
    django_db_setup: Any, settings: Any, fake_anthropic_server: FakeAnthropicServer
) -> Iterator[dict[str, str]]:
    """The environment of the host's processes: a fresh database and Redis keys of its own."""
    db = settings.DATABASES["default"]
    name = f"hostproject_{uuid.uuid4().hex[:10]}"
    admin = _server_url(db, db["NAME"])
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    prefix = f"hostproject-test-{uuid.uuid4().hex[:8]}"
    fake_anthropic_server.reset()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTFLOW_", "DJANGO_", "ANTHROPIC_"))}
    env.update(
        {
            "DJANGO_SETTINGS_MODULE": "hostproject.settings",
            "DATABASE_URL": _server_url(db, name),
            "REDIS_URL": settings.REDIS_URL,
            "HOSTPROJECT_PREFIX": prefix,
            "ANTHROPIC_API_KEY": "test-key",
            "ANTHROPIC_BASE_URL": fake_anthropic_server.base_url,
            "PYTHONPATH": str(HOST),
        }
    )
    yield env
    fake_anthropic_server.reset()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        keys = list(client.scan_iter(f"*{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


def _manage(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "manage.py", *args], cwd=HOST, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(name: str, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (tmp_path / f"{name}.log").open("wb") as log:
            started.append(subprocess.Popen(command, cwd=HOST, env=env, stdout=log, stderr=subprocess.STDOUT))
        return started[-1]

    yield start
    for process in started:
        process.send_signal(signal.SIGTERM)
    for process in started:
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for log in sorted(tmp_path.glob("*.log")):  # shown when the test fails
        print(f"--- {log.name}\n{log.read_text(errors='replace')[-5000:]}")


def _migration_files(app: str) -> int:
    return len([p for p in (ROOT / app / "migrations").glob("0*.py")])


def test_host_project_migrates_and_runs_turns_over_rest_and_websocket(
    host_env: dict[str, str],
    processes: Callable[..., subprocess.Popen[bytes]],
    fake_anthropic_server: FakeAnthropicServer,
    tmp_path: Path,
) -> None:
    env = host_env
    # The host project never imports AgentFlow's deployment project.
    loaded = _manage(
        env,
        "shell",
        "-c",
        "import sys, hostproject.urls, hostproject.asgi, conversations.tasks, memory.tasks;"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'agentflow_project', 'hostproject'}))",
    )
    assert loaded.split("\n")[-2] == "['hostproject']"

    _manage(env, "migrate", "--noinput")
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        applied = dict(
            conn.execute(
                "SELECT app, count(*) FROM django_migrations"
                " WHERE app IN ('conversations', 'intents', 'memory') GROUP BY app"
            ).fetchall()
        )
    assert applied == {app: _migration_files(app) for app in ("conversations", "intents", "memory")}
    key = _manage(
        env,
        "shell",
        "-c",
        "from conversations.services import api_key_create; print(api_key_create(name='host')[1])",
    ).split()[-1]
    assert key.startswith("afk_")

    port, worker_metrics = unused_port(), unused_port()
    env["HOSTPROJECT_WORKER_METRICS_PORT"] = str(worker_metrics)
    queue = env["HOSTPROJECT_PREFIX"]
    worker = ["celery", "-A", "hostproject", "worker", "-P", "threads", "-c", "2", "-Q", queue, "-l", "INFO"]
    processes("worker", [sys.executable, "-m", *worker, "--without-mingle", "--without-gossip"], env)
    processes("web", [sys.executable, "-m", "daphne", "-p", str(port), "hostproject.asgi:application"], env)
    base = f"http://127.0.0.1:{port}"

    def ready() -> bool:
        try:
            return httpx.get(f"{base}/api/health/ready", timeout=5).status_code == 200
        except httpx.HTTPError:
            return False

    _until("the host's readiness probe (database, Redis, channel layer, worker heartbeat)", ready)
    assert httpx.get(f"{base}/").text == "hostproject home"  # the host's own route still answers

    # REST: the host's web process stores the message, the host's worker runs the turn.
    fake_anthropic_server.enqueue(FakeReply(text="Hello from the host's worker."))
    response = httpx.post(
        f"{base}/api/users/alice/messages",
        json={"message": "Hi over REST"},
        headers={"X-API-Key": key},
        timeout=60,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["status"], body["content"]) == ("done", "Hello from the host's worker.")

    # WebSocket: a chat token from the REST API, then one message frame, streamed and final.
    token = httpx.post(f"{base}/api/users/alice/chat-token", headers={"X-API-Key": key}).json()["token"]
    fake_anthropic_server.enqueue(FakeReply(text="And hello over the WebSocket."))

    async def chat() -> list[dict[str, Any]]:
        frames: list[dict[str, Any]] = []
        async with websockets.connect(f"ws://127.0.0.1:{port}/ws/chat/?token={token}") as ws:
            frames.append(json.loads(await asyncio.wait_for(ws.recv(), 10)))
            await ws.send(
                json.dumps({"type": "message", "client_message_id": "c-1", "message": "Hi over WS"})
            )
            while frames[-1]["type"] != "turn":
                frames.append(json.loads(await asyncio.wait_for(ws.recv(), 60)))
        return frames

    frames = asyncio.run(chat())
    assert (frames[0]["type"], frames[0]["user_id"], frames[0]["agent"]) == ("ready", "alice", "support")
    ack = next(f for f in frames if f["type"] == "ack")
    turn = frames[-1]
    assert (turn["message_id"], turn["status"], turn["content"]) == (
        ack["message_id"],
        "done",
        "And hello over the WebSocket.",
    )
    deltas = [f for f in frames if f["type"] == "delta"]
    assert "".join(f["text"] for f in sorted(deltas, key=lambda f: f["seq"])) == turn["content"]

    # Both turns are in the host's database, under its agent.
    with psycopg.connect(env["DATABASE_URL"]) as conn:
        rows = conn.execute(
            "SELECT m.role, m.content, m.status FROM conversations_message m"
            " JOIN conversations_enduser u ON u.id = m.user_id"
            " JOIN conversations_agent a ON a.id = u.agent_id"
            " WHERE a.name = 'support' AND u.external_id = 'alice' ORDER BY m.created_at"
        ).fetchall()
    assert rows == [
        ("user", "Hi over REST", "done"),
        ("assistant", "Hello from the host's worker.", "done"),
        ("user", "Hi over WS", "done"),
        ("assistant", "And hello over the WebSocket.", "done"),
    ]
    assert [r["body"]["messages"][-1]["content"] for r in fake_anthropic_server.requests] == [
        "Hi over REST",
        "Hi over WS",
    ]

    # The host's worker counted both turns on its own metrics port; its web server counts sockets.
    worker = _samples(httpx.get(f"http://127.0.0.1:{worker_metrics}/metrics").text)
    assert worker[("agentflow_turns_total", (("agent", "support"), ("intent", ""), ("outcome", "llm")))] == 2
    tokens = body["usage"]["output_tokens"] + turn["usage"]["output_tokens"]
    model = (("kind", "output"), ("model", "claude-sonnet-5-5"))
    assert worker[("agentflow_llm_tokens_total", model)] == tokens
    web = _samples(httpx.get(f"{base}/metrics").text)
    assert web[("agentflow_websocket_connections", (("kind", "chat"),))] == 0
    assert ("agentflow_turns_total", (("agent", "support"), ("intent", ""), ("outcome", "llm"))) not in web

    # The worker's log is JSON lines; the turn's carries its ids, and the request id of the REST call.
    lines = [json.loads(x) for x in (tmp_path / "worker.log").read_text().splitlines() if x.startswith("{")]
    turn_lines = [x for x in lines if x.get("logger") == "agentflow.turn"]
    assert [x["message_id"] for x in turn_lines] == [body["message_id"], turn["message_id"]]
    assert turn_lines[0]["request_id"] == response.headers["X-Request-ID"]
    assert not any("Hi over" in json.dumps(x) for x in lines)


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
