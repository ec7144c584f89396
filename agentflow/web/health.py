"""Health checks: liveness (the process answers) and readiness (every component it needs answers).

``health_components()`` runs four checks side by side, each under
``AGENTFLOW["HEALTH"]["CHECK_TIMEOUT_SECONDS"]`` (a dead Redis or PostgreSQL cannot hang the probe):

* ``database``: ``SELECT 1`` on a connection from the pool (on a small executor of its own, whose
  connection is returned right after);
* ``redis``: ``PING`` on a fresh connection to ``REDIS_URL``;
* ``channel_layer``: a message sent to a private channel of this process and received back;
* ``worker``: the newest Celery worker heartbeat (``agentflow.worker``) is younger than
  ``WORKER_MAX_AGE_SECONDS``, by Redis's clock.

Each reports ``ok``, ``latency_ms`` and ``error`` (None when ok). The routes are in
``agentflow/web/api.py``; docs/operations.md ("Health") explains them for Kubernetes probes.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import SyncToAsync

from agentflow.conf import conf, redis_url
from agentflow.worker import heartbeat_key

COMPONENTS = ("database", "redis", "channel_layer", "worker")
# Database checks run here, never on the request's thread: a hung connect keeps at most two threads.
_db_executor = ThreadPoolExecutor(max_workers=2, thread_name_prefix="agentflow-health")


def _database_select_one() -> None:
    from django.db import connection

    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    finally:
        connection.close()  # back to the pool: the probe holds no connection between calls


async def _check_database() -> dict[str, Any]:
    await SyncToAsync(_database_select_one, thread_sensitive=False, executor=_db_executor)()
    return {}


class StaleHeartbeat(LookupError):
    """The newest worker heartbeat is older than ``WORKER_MAX_AGE_SECONDS``."""

    def __init__(self, message: str, *, age: float) -> None:
        super().__init__(message)
        self.age = age


def _redis_client(timeout: float) -> Any:
    import redis.asyncio

    return redis.asyncio.Redis.from_url(redis_url(), socket_timeout=timeout, socket_connect_timeout=timeout)


async def _check_redis() -> dict[str, Any]:
    client = _redis_client(conf().HEALTH.CHECK_TIMEOUT_SECONDS)
    try:
        await client.ping()
    finally:
        await client.aclose()
    return {}


async def _check_channel_layer() -> dict[str, Any]:
    from channels.layers import get_channel_layer

    layer = get_channel_layer()
    if layer is None:
        raise RuntimeError("no channel layer is configured (CHANNEL_LAYERS)")
    channel = await layer.new_channel("health")
    nonce = uuid.uuid4().hex
    await layer.send(channel, {"type": "health.ping", "nonce": nonce})
    received = await layer.receive(channel)
    if received.get("nonce") != nonce:
        raise RuntimeError("the channel layer returned another message than the one sent")
    return {}


async def _check_worker() -> dict[str, Any]:
    health = conf().HEALTH
    client = _redis_client(health.CHECK_TIMEOUT_SECONDS)
    try:
        seconds, micros = await client.time()
        now = seconds + micros / 1_000_000
        newest = await client.zrevrange(heartbeat_key(), 0, 0, withscores=True)
        fresh = await client.zcount(heartbeat_key(), now - health.WORKER_MAX_AGE_SECONDS, "+inf")
    finally:
        await client.aclose()
    if not newest:
        raise LookupError("no Celery worker has sent a heartbeat (is a worker running on this queue?)")
    age = round(max(0.0, now - float(newest[0][1])), 1)
    if age > health.WORKER_MAX_AGE_SECONDS:
        raise StaleHeartbeat(
            f"the newest worker heartbeat is {round(age)} s old (limit {health.WORKER_MAX_AGE_SECONDS:.0f} s)",
            age=age,
        )
    return {"heartbeat_age_seconds": age, "workers": fresh}


CHECKS: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
    "database": _check_database,
    "redis": _check_redis,
    "channel_layer": _check_channel_layer,
    "worker": _check_worker,
}


async def _run(name: str, limit: float) -> dict[str, Any]:
    started = time.perf_counter()
    extra: dict[str, Any] = {"heartbeat_age_seconds": None, "workers": 0} if name == "worker" else {}
    error: str | None = None
    try:
        extra.update(await asyncio.wait_for(CHECKS[name](), limit))
    except TimeoutError:
        error = f"no answer within {limit:g} s"
    except Exception as exc:  # a probe reports every failure, whatever its kind
        error = f"{type(exc).__name__}: {exc}"[:500]
        if isinstance(exc, StaleHeartbeat):
            extra["heartbeat_age_seconds"] = exc.age
    latency_ms = round((time.perf_counter() - started) * 1000, 1)
    return {"ok": error is None, "latency_ms": latency_ms, "error": error, **extra}


async def health_components() -> dict[str, dict[str, Any]]:
    """Every component's check, run side by side: name -> ``{ok, latency_ms, error}``."""
    timeout = conf().HEALTH.CHECK_TIMEOUT_SECONDS
    results = await asyncio.gather(*(_run(name, timeout) for name in COMPONENTS))
    return dict(zip(COMPONENTS, results, strict=True))
