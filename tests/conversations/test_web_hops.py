"""The web process's switches between its event loop and a thread, per REST and per WebSocket turn.

Each ``sync_to_async`` (and each middleware step run in async mode, and channels'
``aclose_old_connections``) hands the work to a thread and the result back to the loop: a few
hundred microseconds of CPU each, and most of what the web process spent per turn besides the
database (docs/operations.md, "Web process CPU"). These tests pin the number of such switches on
the paths every turn takes, through the project's ASGI application.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import channels.consumer
import pytest
from asgiref.sync import sync_to_async
from axes.middleware import AxesMiddleware
from channels.testing import HttpCommunicator
from django.db import connections
from django.utils.deprecation import MiddlewareMixin

from agentflow.loops import run_db
from agentflow.testing.fake_anthropic import FakeReply
from agentflow.web import api as web_api
from agentflow.web.asgi import RequestThreads, ReusedThreadASGIHandler
from agentflow.web.http import ApiHttpMiddleware, RequestIdMiddleware
from agentflow_project.asgi import application, django_asgi_app
from conversations import api, consumers
from conversations.audit import AuditContextMiddleware

from .helpers import chat_socket, receive_until, turn_settled

pytestmark = pytest.mark.django_db(transaction=True)


def _count_async_middleware_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    calls: list[str] = []
    for cls in (
        MiddlewareMixin,
        AuditContextMiddleware,
        AxesMiddleware,
        RequestIdMiddleware,
        ApiHttpMiddleware,
    ):
        original = cls.__acall__

        def spy(self: Any, request: Any, _original: Any = original) -> Any:
            calls.append(type(self).__name__)
            return _original(self, request)

        monkeypatch.setattr(cls, "__acall__", spy)
    return calls


async def test_a_rest_message_runs_every_middleware_on_the_request_thread_and_hops_twice(
    api_key: str, celery_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    async_middleware = _count_async_middleware_calls(monkeypatch)
    hops: list[str] = []

    def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        hops.append(func.__name__)
        return sync_to_async(func, *args, **kwargs)

    monkeypatch.setattr(api, "sync_to_async", counting)
    body = json.dumps({"message": "Where is my order?", "wait_seconds": 0}).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"x-api-key", api_key.encode()),
        (b"host", b"localhost"),
    ]

    response = await HttpCommunicator(
        application, "POST", "/api/users/hops-alice/messages", body, headers
    ).get_response(timeout=30)

    assert response["status"] == 202
    # No middleware step ran in async mode: each would have been a hop of its own.
    assert async_middleware == []
    # The message stored and its turn queued in one call on the request's thread, then the result read.
    assert hops == ["_accept_and_queue", "turn_result_for"]
    await turn_settled(json.loads(response["body"])["message_id"])


async def test_a_websocket_turn_never_hops_to_close_old_database_connections(
    celery_worker: Any, fake_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    original = channels.consumer.aclose_old_connections

    async def counting() -> None:
        calls.append(1)
        await original()

    monkeypatch.setattr(channels.consumer, "aclose_old_connections", counting)
    fake_llm.enqueue(FakeReply(text="It ships tomorrow."))
    communicator = await chat_socket("hops-bob")

    await communicator.send_json_to(
        {"type": "message", "message": "Where is my order?", "client_message_id": "h-1"}
    )
    turn, frames = await receive_until(communicator, "turn", timeout=20)
    during_the_turn = list(calls)
    await communicator.disconnect()

    assert turn["status"] == "done"
    assert frames[0]["type"] == "ack"
    # Frames from the client and events from the channel layer alike, and none of them hopped.
    assert during_the_turn == []


async def test_a_websocket_message_is_stored_and_queued_in_one_database_call(
    celery_worker: Any, fake_llm: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    hops: list[str] = []

    async def counting(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        hops.append(func.__name__)
        return await run_db(func, *args, **kwargs)

    fake_llm.enqueue(FakeReply(text="It ships tomorrow."))
    communicator = await chat_socket("hops-carol")
    monkeypatch.setattr(consumers, "run_db", counting)

    await communicator.send_json_to(
        {"type": "message", "message": "Where is my order?", "client_message_id": "h-2"}
    )
    turn, frames = await receive_until(communicator, "turn", timeout=20)
    await communicator.disconnect()

    assert turn["status"] == "done"
    assert frames[0]["type"] == "ack"
    # The revocation check, the agent's limits, the message and its turn in one call; the ack first.
    assert hops == ["_accept"]


async def _idle_again(threads: RequestThreads, count: int) -> None:
    """Wait until ``count`` request threads are idle (a thread is taken back once its work has run)."""
    deadline = time.monotonic() + 5
    while threads.idle() < count:
        assert time.monotonic() < deadline, "the request thread was not taken back"
        await asyncio.sleep(0.01)


async def test_rest_requests_one_after_another_reuse_one_thread_and_its_database_wrapper(
    api_key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[tuple[int, Any]] = []
    original = web_api.api_key_check

    def spying(*, plain: str) -> Any:
        key = original(plain=plain)  # runs on the request's thread, with a database connection
        seen.append((threading.get_ident(), connections["default"]))
        return key

    monkeypatch.setattr(web_api, "api_key_check", spying)
    # A handler of its own: the project's is shared with earlier tests, whose requests may still be
    # giving their threads back.
    assert isinstance(django_asgi_app, ReusedThreadASGIHandler)  # the project serves with it
    handler = ReusedThreadASGIHandler()
    threads = handler.threads
    headers = [(b"x-api-key", api_key.encode()), (b"host", b"localhost")]
    others = [threads.take() for _ in range(3)]  # idle threads other requests left, as in a busy process
    for executor in others:
        threads.give_back(executor)
    await _idle_again(threads, 3)
    started = threads.started
    for _ in range(3):
        idle = threads.idle()
        communicator = HttpCommunicator(handler, "GET", "/api/users/reuse-alice/sessions", b"", headers)
        response = await communicator.get_response(timeout=30)
        await communicator.wait(timeout=10)
        assert response["status"] == 404  # no such end user; the key was checked all the same
        # Given back: no pooled connection stays checked out by the idle thread.
        assert seen[-1][1].connection is None
        await _idle_again(threads, max(idle, 1))  # this request's thread is back, on top of the list

    # One thread (and its database wrapper, where compiled queries are kept) for all three.
    assert len({ident for ident, _ in seen}) == 1
    assert len({id(wrapper) for _, wrapper in seen}) == 1
    assert threads.started - started <= 1


def test_a_request_thread_is_handed_out_again_only_once_its_work_has_run() -> None:
    threads = RequestThreads(keep=2)
    first, second = threads.take(), threads.take()
    assert first is not second  # requests at once: a thread each
    release = threading.Event()
    first.submit(release.wait, 10)  # a step of a request whose client went away, still running
    threads.give_back(first)
    threads.give_back(second)
    deadline = time.monotonic() + 5
    while threads.idle() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert threads.take() is second
    assert threads.take() is not first  # busy: a new thread instead of waiting behind that step
    release.set()
    while threads.idle() < 1:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert threads.take() is first
    # Beyond ``keep`` idle threads, a returned one is stopped.
    extra = [threads.take() for _ in range(3)]
    for executor in extra:
        threads.give_back(executor)
    while threads.idle() < 2:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.1)
    assert threads.idle() == 2
    assert sum(executor._shutdown for executor in extra) == 1
