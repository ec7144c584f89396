"""The examples in ``examples/`` run against a live server as the README tells users to run them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agentflow.testing.fake_anthropic import FakeReply
from conversations.chat_tokens import chat_token_create
from conversations.models import Message
from tests.browser.conftest import live_asgi_url  # noqa: F401 (the fixture)

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
WS_CLIENT = ROOT / "examples" / "ws_client.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(WS_CLIENT), *args], capture_output=True, text=True, timeout=60, cwd=ROOT
    )


def test_ws_client_prints_the_streamed_reply_and_the_turn_not_the_echo(
    live_asgi_url: str,  # noqa: F811 (the imported fixture)
    celery_worker: Any,
    fake_llm: Any,
) -> None:
    fake_llm.enqueue(FakeReply(text="Reset it from the sign-in page, then sign in again."))
    token = chat_token_create(external_id="alice")

    result = _run(token, "My login is broken", "--url", live_asgi_url)

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "connected as alice to agent agentflow"
    assert lines[1] == "you: My login is broken"
    assert lines[2] == "bot (streaming): Reset it from the sign-in page, then sign in again."
    assert lines[3] == "bot: Reset it from the sign-in page, then sign in again."
    assert lines[4].startswith("thread_event=NEW_TOPIC  intent=")
    assert "handled_by=llm" in lines[4]
    reply = Message.objects.get(role=Message.Role.ASSISTANT, user__external_id="alice")
    assert reply.content == "Reset it from the sign-in page, then sign in again."


def test_ws_client_says_why_a_held_thread_gets_no_reply(
    live_asgi_url: str,  # noqa: F811
    celery_worker: Any,
    fake_llm: Any,
) -> None:
    from conversations.handoff import escalation_open
    from conversations.models import Thread

    fake_llm.enqueue(FakeReply(text="Let me look into that login problem."))
    token = chat_token_create(external_id="bob")
    assert _run(token, "My login is broken", "--url", live_asgi_url).returncode == 0
    escalation_open(thread=Thread.objects.get(user__external_id="bob"), message=None, reason="test")

    result = _run(token, "Still broken, any news?", "--url", live_asgi_url)

    assert result.returncode == 0, result.stderr
    assert (
        "bot: (no reply: a human holds this thread; staff answer here until they hand it back)"
        in result.stdout
    )
    assert "handled_by=human" in result.stdout
    assert len(fake_llm.requests) == 1  # the bot stayed silent


def test_ws_client_reports_a_refused_token(live_asgi_url: str) -> None:  # noqa: F811
    result = _run("not-a-token", "hello", "--url", live_asgi_url, "--timeout", "10")

    assert result.returncode == 1
    assert result.stderr.startswith("the server refused the connection: unauthorized: ")
    assert "you:" not in result.stdout
