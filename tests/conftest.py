"""Test set-up: the real stack.

PostgreSQL + pgvector (DATABASE_URL or the embedded server), Redis (REDIS_URL, localhost:6379 or the
embedded Valkey), a real Celery worker thread, Channels on channels-redis. The only fakes are outside
the project: the Anthropic Messages API (a fake server on loopback, driven by the real SDK) and MCP
servers (in-process FastMCP).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from agentflow.testing.fake_anthropic import FakeAnthropicServer

_RUN = os.environ["AGENTFLOW_TEST_RUN"]
ORIGIN = (b"origin", b"http://localhost")


@pytest.fixture(scope="session")
def fake_anthropic_server() -> Iterator[FakeAnthropicServer]:
    server = FakeAnthropicServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def fake_llm(fake_anthropic_server: FakeAnthropicServer, settings: Any, monkeypatch: pytest.MonkeyPatch):
    """Online mode against the fake Messages API; the scripted replies start empty."""
    fake_anthropic_server.reset()
    settings.ANTHROPIC_API_KEY = "test-key"
    settings.ANTHROPIC_BASE_URL = fake_anthropic_server.base_url
    monkeypatch.setenv("ANTHROPIC_API_KEY", "test-key")
    monkeypatch.setenv("ANTHROPIC_BASE_URL", fake_anthropic_server.base_url)
    yield fake_anthropic_server
    fake_anthropic_server.reset()


@pytest.fixture
def anthropic_client(fake_llm: FakeAnthropicServer):
    from anthropic import AsyncAnthropic

    return AsyncAnthropic(api_key="test-key", base_url=fake_llm.base_url, max_retries=0)


@pytest.fixture(autouse=True)
def _close_executor_connections() -> Iterator[None]:
    """Return the connection of asgiref's thread-sensitive executor thread after each test.

    ``process_message`` reaches the ORM through ``sync_to_async``, whose thread keeps its connection
    checked out of the pool; left open, it keeps PostgreSQL from dropping the test database.
    """
    yield
    from asgiref.sync import SyncToAsync
    from django.db import connections

    SyncToAsync.single_thread_executor.submit(connections.close_all).result()


@pytest.fixture(autouse=True)
def _fresh_agent_cache() -> Iterator[None]:
    from agentflow.registry import clear_agent_cache

    clear_agent_cache()
    yield
    clear_agent_cache()


def _delete_run_keys(pattern: str) -> None:
    """Delete this run's Redis keys only (cache.clear() would FLUSHDB a shared database)."""
    import redis
    from django.conf import settings

    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        keys = list(client.scan_iter(pattern, count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(autouse=True)
def _clear_rate_limits() -> Iterator[None]:
    """Each test starts with full rate-limit buckets, no counted connections and no revoked tokens."""
    yield
    _delete_run_keys(f"agentflow-test-{_RUN}:*ratelimit:*")
    _delete_run_keys(f"agentflow-test-{_RUN}:*chat-revoked:*")
    _delete_run_keys(f"agentflow-test-{_RUN}:*llm-breaker:*")
    _delete_run_keys(f"agentflow-test-{_RUN}:*recovery:*")


@pytest.fixture(scope="session")
def celery_worker(django_db_setup: Any, django_db_blocker: Any) -> Iterator[Any]:
    """A real Celery worker (threads pool) in this process, consuming this run's own queue."""
    from celery.contrib.testing.worker import start_worker

    from agentflow_project.celery import app

    with django_db_blocker.unblock():
        with start_worker(
            app,
            pool="threads",
            concurrency=4,
            perform_ping_check=False,
            loglevel="WARNING",
            shutdown_timeout=30,
        ) as worker:
            yield worker
        from django.db import connections

        connections.close_all()


@pytest.fixture
def api_key(db: Any) -> str:
    from conversations.services import api_key_create

    _, plain = api_key_create(name=f"test-{uuid.uuid4().hex[:8]}")
    return plain


def pytest_sessionfinish(session: Any, exitstatus: int) -> None:
    """Drop this run's Celery queue from Redis."""
    try:
        _delete_run_keys(f"*agentflow-test-{_RUN}*")
    except Exception:
        pass


@pytest.fixture(scope="session", autouse=True)
def _terminate_stray_connections(django_db_setup: Any, django_db_blocker: Any) -> Iterator[None]:
    """Before the test database is dropped, end connections that threads (pool, workers) still hold."""
    yield
    from django.db import connection

    with django_db_blocker.unblock(), connection.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
