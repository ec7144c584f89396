"""Helpers shared by the conversation tests."""

from __future__ import annotations

import time
from typing import Any

from channels.testing import WebsocketCommunicator
from django.core import signing
from django.utils import timezone

from conversations.models import ChatSession, EndUser, Message, Thread
from conversations.services import rate_limit_check


def stored_counts() -> dict[str, int]:
    """How many conversation rows exist: compared before and after a request that must store nothing."""
    return {
        "users": EndUser.objects.count(),
        "sessions": ChatSession.objects.count(),
        "threads": Thread.objects.count(),
        "messages": Message.objects.count(),
    }


async def astored_counts() -> dict[str, int]:
    return {
        "users": await EndUser.objects.acount(),
        "sessions": await ChatSession.objects.acount(),
        "threads": await Thread.objects.acount(),
        "messages": await Message.objects.acount(),
    }


def use_up_rate_limit(user_id: str, per_minute: int) -> None:
    """Empty the user's message bucket (``per_minute`` tokens), so that the next message is refused."""
    for _ in range(per_minute):
        rate_limit_check(user_id=user_id, per_minute=per_minute, now=timezone.now())


async def receive_until(communicator, kind: str, *, timeout: float = 20) -> tuple[dict, list[dict]]:  # noqa: ASYNC109
    """Read frames until one of type ``kind``; returns it and the frames read before it.

    A turn sends several frames (user_message, typing, delta, thread) before its ``turn`` frame.
    """
    deadline = time.monotonic() + timeout
    before: list[dict] = []
    while True:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"no {kind!r} frame within {timeout} s; got {[f['type'] for f in before]}"
        frame = await communicator.receive_json_from(timeout=remaining)
        if frame["type"] == kind:
            return frame, before
        before.append(frame)


def without_server_time(frame: dict) -> dict:
    """A ``ready`` frame minus its clock reading, for exact comparison."""
    return {k: v for k, v in frame.items() if k != "server_time"}


async def turn_settled(message_id: str, wait: float = 20) -> None:
    """Wait until a queued turn is no longer pending or processing, when a Celery worker runs in this
    session (a turn still running when the test ends races the next test's database reset)."""
    import asyncio

    deadline = time.monotonic() + wait
    while await Message.objects.filter(pk=message_id, status__in=["pending", "processing"]).aexists():
        if time.monotonic() > deadline:
            return  # no worker in this run: the turn stays queued, and nothing races the reset
        await asyncio.sleep(0.05)


async def chat_socket(external_id: str) -> WebsocketCommunicator:
    """A chat socket of end user ``external_id`` (the default agent), past its ``ready`` frame."""
    from agentflow_project.asgi import application
    from conversations.chat_tokens import CHAT_TOKEN_SALT
    from tests.conftest import ORIGIN

    token = signing.dumps({"u": external_id}, salt=CHAT_TOKEN_SALT, compress=True)
    communicator = WebsocketCommunicator(application, f"/ws/chat/?token={token}", headers=[ORIGIN])
    connected, _ = await communicator.connect()
    assert connected
    assert (await communicator.receive_json_from())["type"] == "ready"
    return communicator


def place_after(context: tuple[str, str], text: str, *, profile: str = "task") -> Any:
    """``decide_thread`` for ``text`` with one open thread, a minute old, of a problem and the
    assistant's reply (``context``), embedded with the process's encoder and the shipped model."""
    from datetime import UTC, datetime, timedelta

    from agentflow.embeddings import get_embedder
    from conversations.thread_detection import Candidate, decide_thread
    from conversations.thread_features import ThreadState, content_words, load_model

    now = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
    problem, reply = context
    vector = get_embedder().embed_one(problem)
    state = ThreadState(vector, vector, vector.copy(), content_words(problem) | content_words(reply), reply)
    return decide_thread(
        text=text,
        embedding=get_embedder().embed_one(text),
        candidates=[Candidate("open", state, now - timedelta(minutes=1))],
        now=now,
        inactivity=timedelta(minutes=30),
        model=load_model(profile),
    )
