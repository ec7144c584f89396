"""Liveness and readiness: every component checked for real, each failure made on purpose for one request."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings
from django.db import connection
from django.test import Client

from agentflow.worker import (
    WorkerHeartbeat,
    heartbeat_key,
    worker_heartbeat_beat,
    worker_heartbeat_forget,
)
from tests.faults import POOL_TIMEOUT, dead_redis_url, refused_pool

OK = {"ok": True, "error": None}


def _without_latency(components: dict[str, Any]) -> dict[str, Any]:
    for component in components.values():
        assert isinstance(component.pop("latency_ms"), float)
    return components


@pytest.fixture
def fresh_queue(settings: Any) -> Iterator[str]:
    """A queue no worker consumes: no heartbeat under its key until a test writes one."""
    settings.CELERY_TASK_DEFAULT_QUEUE = f"{django_settings.CELERY_TASK_DEFAULT_QUEUE}-health-empty"
    yield settings.CELERY_TASK_DEFAULT_QUEUE
    redis.Redis.from_url(django_settings.REDIS_URL).delete(heartbeat_key())


@pytest.fixture
def pool_timeout() -> Iterator[None]:
    connection.close()  # this thread's connection goes back; the next query asks the pool
    with refused_pool():
        yield


def test_live_answers_without_touching_any_component() -> None:
    # No django_db mark: a database query here would fail the test.
    response = Client().get("/api/health/live")

    assert response.status_code == 200
    assert response.json() == {"status": "ok"}
    assert not response.has_header("Retry-After")


@pytest.mark.django_db(transaction=True)
def test_ready_with_every_component_up_and_a_worker(celery_worker: Any) -> None:
    response = Client().get("/api/health/ready")

    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    components = _without_latency(body["components"])
    worker = components.pop("worker")
    assert components == {"database": OK, "redis": OK, "channel_layer": OK}
    assert (worker["ok"], worker["error"], worker["workers"]) == (True, None, 1)
    assert 0 <= worker["heartbeat_age_seconds"] <= 30
    assert not response.has_header("Retry-After")


@pytest.mark.django_db
def test_ready_is_503_without_a_worker_heartbeat(fresh_queue: str) -> None:
    response = Client().get("/api/health/ready")

    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    body = response.json()
    assert body["status"] == "unavailable"
    assert _without_latency(body["components"]) == {
        "database": OK,
        "redis": OK,
        "channel_layer": OK,
        "worker": {
            "ok": False,
            "error": "LookupError: no Celery worker has sent a heartbeat (is a worker running on this queue?)",
            "heartbeat_age_seconds": None,
            "workers": 0,
        },
    }


@pytest.mark.django_db
def test_ready_is_503_when_the_newest_heartbeat_is_too_old(fresh_queue: str) -> None:
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    seconds, micros = client.time()
    client.zadd(heartbeat_key(), {"celery@gone": seconds + micros / 1_000_000 - 100})

    response = Client().get("/api/health/ready")

    assert response.status_code == 503
    worker = response.json()["components"]["worker"]
    assert (worker["ok"], worker["workers"]) == (False, 0)
    assert worker["heartbeat_age_seconds"] >= 100
    age = round(worker["heartbeat_age_seconds"])
    assert worker["error"] == f"StaleHeartbeat: the newest worker heartbeat is {age} s old (limit 30 s)"


@pytest.mark.django_db
def test_heartbeat_makes_ready_and_a_stopping_worker_removes_it(fresh_queue: str) -> None:
    worker_heartbeat_beat(hostname="celery@web-1")
    ready = Client().get("/api/health/ready").json()["components"]["worker"]

    worker_heartbeat_forget(hostname="celery@web-1")
    gone = Client().get("/api/health/ready").json()["components"]["worker"]

    assert (ready["ok"], ready["workers"]) == (True, 1)
    assert (gone["ok"], gone["workers"]) == (False, 0)


def _workers_in_heartbeat() -> list[bytes]:
    return list(redis.Redis.from_url(django_settings.REDIS_URL).zrange(heartbeat_key(), 0, -1))


@pytest.mark.django_db
def test_a_command_line_worker_beats_only_once_it_is_ready(fresh_queue: str) -> None:
    """Readiness stays red while a fresh worker warms up: the heartbeat waits for ``worker_ready``."""
    from celery.apps.worker import Worker as CommandLineWorker
    from celery.signals import worker_ready

    parent = CommandLineWorker.__new__(CommandLineWorker)  # the step reads only its hostname
    parent.hostname = "celery@warming-up"
    step = WorkerHeartbeat(parent)
    step.start(parent)
    try:
        time.sleep(1.5)
        before = _workers_in_heartbeat()
        worker_ready.send(sender=None)
        deadline = time.monotonic() + 10
        while not _workers_in_heartbeat() and time.monotonic() < deadline:
            time.sleep(0.1)
        after = _workers_in_heartbeat()
    finally:
        step.stop(parent)

    assert (before, after, _workers_in_heartbeat()) == ([], [b"celery@warming-up"], [])


@pytest.mark.django_db
def test_ready_is_503_when_redis_and_the_channel_layer_are_down(settings: Any) -> None:
    dead = dead_redis_url()
    settings.REDIS_URL = dead
    settings.CHANNEL_LAYERS = {
        "default": {"BACKEND": "agentflow.channel_layer.RedisChannelLayer", "CONFIG": {"hosts": [dead]}}
    }

    response = Client().get("/api/health/ready")

    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    components = response.json()["components"]
    assert components["database"]["ok"] is True
    for name in ("redis", "channel_layer", "worker"):
        assert components[name]["ok"] is False
        assert components[name]["error"].startswith("ConnectionError: "), components[name]


@pytest.mark.django_db(transaction=True)
def test_ready_and_health_are_503_when_the_database_pool_refuses(pool_timeout: None) -> None:
    ready = Client().get("/api/health/ready")
    health = Client().get("/api/health")

    assert (ready.status_code, health.status_code) == (503, 503)
    assert (ready["Retry-After"], health["Retry-After"]) == ("5", "5")
    body = health.json()
    assert (body["status"], body["ready"], body["offline"]) == ("unavailable", False, True)
    database = body["components"]["database"]
    assert database["ok"] is False
    assert database["error"] == f"OperationalError: {POOL_TIMEOUT}"
    assert ready.json()["components"]["database"]["error"] == database["error"]
    assert body["components"]["redis"]["ok"] is True


@pytest.mark.django_db
def test_ready_times_out_a_component_that_does_not_answer(settings: Any, monkeypatch: Any) -> None:
    import asyncio

    from agentflow.web import health

    async def hang() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    monkeypatch.setitem(health.CHECKS, "channel_layer", hang)
    settings.AGENTFLOW = {**settings.AGENTFLOW, "HEALTH": {"CHECK_TIMEOUT_SECONDS": 0.2}}

    response = Client().get("/api/health/ready")

    assert response.status_code == 503
    channel_layer = response.json()["components"]["channel_layer"]
    assert (channel_layer["ok"], channel_layer["error"]) == (False, "no answer within 0.2 s")
