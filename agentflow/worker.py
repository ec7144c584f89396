"""The Celery workers' heartbeat in Redis, which the readiness probe reads (docs/operations.md, "Health").

Every worker process writes its hostname into one sorted set per queue, scored with Redis's own clock
(``TIME``, so hosts with skewed clocks agree), every ``AGENTFLOW["HEALTH"]["WORKER_HEARTBEAT_SECONDS"]``
from a thread started by a worker bootstep, and removes it when it stops. The readiness probe
(``agentflow.web.health``) reads the newest score. A worker whose Redis is down keeps trying.

This module is imported by a project's Celery app (``celery_setup``): it imports nothing of Django at
import time.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from datetime import datetime
from typing import Any

from celery import bootsteps
from celery.apps.worker import Worker as CommandLineWorker
from celery.signals import worker_ready

from agentflow import hoptrace, metrics
from agentflow.jobs import TURN_TASK

logger = logging.getLogger("agentflow.health")

# KEYS[1] the set; ARGV[1] the worker; ARGV[2] forget entries older than this (s); ARGV[3] key TTL (s).
BEAT_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZADD', KEYS[1], now, ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[2]))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return tostring(now)
"""
FORGET_AFTER_SECONDS = 3600  # entries of workers that died without saying so are dropped after this


def heartbeat_key() -> str:
    """The sorted set of this deployment's workers (one per turn queue, ``AGENTFLOW_CELERY_QUEUE``)."""
    from django.conf import settings

    queue = getattr(settings, "CELERY_TASK_DEFAULT_QUEUE", None) or "celery"
    return f"agentflow:health:workers:{queue}"


def _client() -> Any:
    import redis

    from agentflow.conf import redis_url

    return redis.Redis.from_url(redis_url(), socket_timeout=5, socket_connect_timeout=5)


def worker_heartbeat_beat(*, hostname: str, client: Any = None) -> None:
    """Record that the worker ``hostname`` is alive now (one Redis round trip)."""
    own = client is None
    client = client or _client()
    try:
        client.eval(BEAT_SCRIPT, 1, heartbeat_key(), hostname, FORGET_AFTER_SECONDS, FORGET_AFTER_SECONDS)
    finally:
        if own:
            client.close()


def worker_heartbeat_forget(*, hostname: str) -> None:
    """Remove the worker ``hostname`` from the set (it is stopping)."""
    client = _client()
    try:
        client.zrem(heartbeat_key(), hostname)
    finally:
        client.close()


class WorkerHeartbeat(bootsteps.StartStopStep):
    """Worker bootstep: a daemon thread that beats until the worker stops.

    A command-line worker beats only once it is ready to take turns: Celery sends ``worker_ready``
    when the worker starts consuming, and the worker's warm-up (``conversations.tasks``, connected when
    the task modules were imported, so before this step's receiver) loads the agent and the embedding
    model first. Beating from the start made readiness green 17-19 s before a fresh worker took a
    turn. An embedded worker (tests) sends no ``worker_ready`` and beats at once.
    """

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._hostname = ""

    def _on_ready(self, **kwargs: Any) -> None:
        self._ready.set()

    def start(self, parent: Any) -> None:
        self._hostname = str(parent.hostname)
        self._stop.clear()
        if isinstance(parent, CommandLineWorker):
            worker_ready.connect(self._on_ready, weak=False)
        else:
            self._ready.set()
        self._thread = threading.Thread(target=self._run, name="agentflow-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from agentflow.conf import conf

        interval = conf().HEALTH.WORKER_HEARTBEAT_SECONDS
        while not self._ready.wait(0.5):
            if self._stop.is_set():
                return
        client = _client()
        try:
            while True:
                try:
                    worker_heartbeat_beat(hostname=self._hostname, client=client)
                    metrics.WORKER_HEARTBEATS.inc()
                    metrics.WORKER_LAST_HEARTBEAT.set_to_current_time()
                except Exception as exc:  # Redis down: keep beating, readiness shows the gap
                    metrics.WORKER_HEARTBEAT_FAILURES.inc()
                    logger.warning("worker heartbeat not written: %s: %s", type(exc).__name__, exc)
                if self._stop.wait(interval):
                    return
        finally:
            client.close()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        worker_ready.disconnect(self._on_ready)
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        try:
            worker_heartbeat_forget(hostname=self._hostname)
        except Exception as exc:
            logger.warning("worker heartbeat not removed: %s: %s", type(exc).__name__, exc)

    shutdown = stop


class WorkerMetricsServer(bootsteps.StartStopStep):
    """Worker bootstep: serve this worker's Prometheus metrics on ``AGENTFLOW["METRICS"]["WORKER_PORT"]``.

    Off when the port is 0 (the default). prometheus-client's own HTTP server, on a daemon thread.
    """

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._server: Any = None
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        from prometheus_client import start_http_server

        from agentflow.conf import conf

        settings = conf().METRICS
        if not settings.ENABLED or not settings.WORKER_PORT:
            return
        self._server, self._thread = start_http_server(settings.WORKER_PORT, addr=settings.WORKER_ADDRESS)
        logger.info("worker metrics on http://%s:%s/metrics", settings.WORKER_ADDRESS, settings.WORKER_PORT)

    def stop(self, parent: Any) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    shutdown = stop


REQUEST_ID_HEADER = "agentflow_request_id"
# When the task was queued (Unix time, the publisher's clock): its wait in the queue is measured from it.
QUEUED_AT_HEADER = "agentflow_queued_at"


def _header(request: Any, name: str) -> Any:
    return getattr(request, name, None) or (getattr(request, "headers", None) or {}).get(name)


def _task_published(headers: dict[str, Any] | None = None, **kwargs: Any) -> None:
    """Carry the request id of the logs, and the time, into the task the request queues."""
    import structlog

    if headers is not None:
        headers[QUEUED_AT_HEADER] = time.time()  # a retry is queued anew: its own time

    request_id = structlog.contextvars.get_contextvars().get("request_id")
    if request_id and headers is not None:
        headers.setdefault(REQUEST_ID_HEADER, request_id)


def _task_started(task_id: str = "", task: Any = None, **kwargs: Any) -> None:
    """Bind the task's ids (and the request id it came with) to its logs; observe its wait in the queue."""
    from agentflow import logs

    logs.unbind_all()
    request = getattr(task, "request", None)
    name = getattr(task, "name", "")
    logs.bind(task=name, task_id=task_id, request_id=_header(request, REQUEST_ID_HEADER))
    queued_at = _header(request, QUEUED_AT_HEADER)
    if queued_at:
        metrics.TASK_QUEUE_SECONDS.labels(task=name).observe(
            max(0.0, time.time() - _due(float(queued_at), getattr(request, "eta", None)))
        )


def _due(queued_at: float, eta: Any) -> float:
    """When a task queued at ``queued_at`` could first run: then, or at its ``eta`` (a countdown)."""
    if isinstance(eta, str):
        with contextlib.suppress(ValueError):
            eta = datetime.fromisoformat(eta)
    if isinstance(eta, datetime) and eta.tzinfo is not None:
        return max(queued_at, eta.timestamp())
    return queued_at


def _task_received(request: Any = None, **kwargs: Any) -> None:
    """``AGENTFLOW_HOP_TRACE``: the worker's consumer received a turn task (``k_recv``)."""
    if hoptrace.tracing() and getattr(request, "name", None) == TURN_TASK:
        args = getattr(request, "args", None) or ()
        hoptrace.mark(
            (getattr(request, "kwargs", None) or {}).get("message_id") or (args[0] if args else None),
            "k_recv",
        )


def _task_ended(**kwargs: Any) -> None:
    from agentflow import logs

    logs.unbind_all()


def celery_setup(app: Any) -> None:
    """Add AgentFlow's worker steps to a project's Celery app.

    The heartbeat the readiness probe reads, the worker's metrics server
    (``AGENTFLOW["METRICS"]["WORKER_PORT"]``), and the ids of each task in its logs (the request id
    of the web request that queued it included). Call it once where the project makes its Celery
    app (``app = Celery(...)``; ``app.autodiscover_tasks()``; ``celery_setup(app)``).
    """
    from celery import signals

    app.steps["worker"].add(WorkerHeartbeat)
    app.steps["worker"].add(WorkerMetricsServer)
    signals.before_task_publish.connect(_task_published, weak=False, dispatch_uid="agentflow-request-id")
    signals.task_prerun.connect(_task_started, weak=False, dispatch_uid="agentflow-task-ids")
    signals.task_postrun.connect(_task_ended, weak=False, dispatch_uid="agentflow-task-ids-end")
    signals.task_received.connect(_task_received, weak=False, dispatch_uid="agentflow-hop-trace")
