"""The web process stopping (SIGTERM): daphne as ``agentflow_run`` starts it answers a waiting REST call
with its 202, closes each chat socket with an ``error`` frame and 1012 on the wire, and exits at once,
where it used to drop both and hang until killed (agentflow.drain, agentflow.web.serving)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from asgiref.sync import sync_to_async
from django.test import Client

from agentflow import drain
from agentflow_project.runtime import web_command
from conversations.chat_tokens import chat_token_create
from conversations.models import Message
from tests.faults import unused_port

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def web(settings: Any, tmp_path: Path) -> Any:
    """daphne on a port of its own, against the test database; no worker consumes its queue, so a
    REST call waits for its whole ``wait_seconds``."""
    db = settings.DATABASES["default"]
    port, queue = unused_port(), f"drain-test-{uuid.uuid4().hex[:8]}"
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "agentflow_project.settings",
        "DATABASE_URL": f"postgresql://{db['USER']}:@/{db['NAME']}?host={db['HOST']}",
        "REDIS_URL": settings.REDIS_URL,
        "DJANGO_SECRET_KEY": settings.SECRET_KEY,  # the chat tokens this test signs
        "AGENTFLOW_CELERY_QUEUE": queue,
        "AGENTFLOW_AUTO_MIGRATE": "false",
        "AGENTFLOW_SKIP_DOTENV": "true",
        "DJANGO_DEBUG": "true",
        "AGENTFLOW_WEB_DRAIN_SECONDS": "20",
    }
    log = tmp_path / "web.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            web_command(port=port), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    process.base, process.log = f"http://127.0.0.1:{port}", log  # type: ignore[attr-defined]
    yield process
    if process.poll() is None:
        process.kill()
        process.wait()
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        client.delete(queue, f"_kombu.binding.{queue}")
    finally:
        client.close()


async def _live(session: aiohttp.ClientSession, base: str) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            async with session.get(base + "/api/health/live") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.2)
    pytest.fail("the web server did not answer within 60 s")


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(180)
async def test_sigterm_answers_the_waiting_rest_call_closes_sockets_with_1012_and_exits(
    web: Any, api_key: str
) -> None:
    user = f"drain-{uuid.uuid4().hex[:6]}"
    token = await sync_to_async(chat_token_create)(external_id=user)
    async with aiohttp.ClientSession() as session:
        await _live(session, web.base)
        ws = await session.ws_connect(
            web.base.replace("http", "ws") + f"/ws/chat/?token={token}", headers={"Origin": web.base}
        )
        assert (await ws.receive_json(timeout=20))["type"] == "ready"
        posted = asyncio.ensure_future(
            session.post(
                web.base + f"/api/users/{user}/messages",
                json={"message": "My invoice is wrong", "wait_seconds": 60},
                headers={"X-API-Key": api_key},
            )
        )
        deadline = time.monotonic() + 30
        while not await Message.objects.filter(session__user__external_id=user).aexists():
            assert time.monotonic() < deadline, "the message was not stored"
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # the call now waits for its turn (no worker runs it)

        stopped_at = time.monotonic()
        web.send_signal(signal.SIGTERM)

        frame = await ws.receive_json(timeout=10)
        while frame["type"] != "error":  # the live events of the REST message come first
            frame = await ws.receive_json(timeout=10)
        assert frame["code"] == "server_restarting"
        closing = await ws.receive(timeout=10)
        assert (closing.type, ws.close_code) == (aiohttp.WSMsgType.CLOSE, 1012)  # a close frame, not 1006
        response = await asyncio.wait_for(posted, 10)
        body = await response.json()
        assert response.status == 202, body
        assert body["status"] in ("pending", "processing")
        exit_code = await asyncio.to_thread(web.wait, 15)
        took = time.monotonic() - stopped_at

    assert exit_code == 0, web.log.read_text()[-3000:]
    assert took < 10, f"exited {took:.1f} s after SIGTERM (drain bound 20 s): it waited for nothing"
    assert "draining: 1 REST waits answered, 1 sockets closed with 1012" in web.log.read_text()
    message = await Message.objects.aget(pk=body["message_id"])  # kept: the turn goes on in a worker
    assert message.content == "My invoice is wrong"


def test_readiness_answers_503_draining_while_the_process_drains(db: Any) -> None:
    client = Client()
    drain._state["draining"] = True
    try:
        response = client.get("/api/health/ready")
    finally:
        drain._state["draining"] = False
    assert response.status_code == 503
    assert response.json()["status"] == "draining"
    assert response["Retry-After"]


async def test_a_wait_ends_with_none_when_the_drain_begins_and_returns_its_result_otherwise() -> None:
    assert await drain.unless_draining(asyncio.sleep(0, result="done")) == "done"

    waiting = asyncio.ensure_future(drain.unless_draining(asyncio.sleep(30, result="late")))
    await asyncio.sleep(0.05)
    await drain.drain(seconds=0)
    try:
        assert await asyncio.wait_for(waiting, 2) is None
        assert await drain.unless_draining(asyncio.sleep(30)) is None  # draining: no wait at all
    finally:
        drain._state["draining"] = False


async def test_a_caller_cancelled_while_waiting_cancels_its_wait() -> None:
    inner = asyncio.ensure_future(asyncio.sleep(30))
    outer = asyncio.ensure_future(drain.unless_draining(inner))
    await asyncio.sleep(0.05)
    outer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await outer
    assert inner.cancelled()
    assert not drain._waits
