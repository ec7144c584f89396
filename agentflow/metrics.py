"""AgentFlow's Prometheus metrics (prometheus-client), defined once; docs/operations.md lists them.

Each process counts what it does: the web process its WebSocket connections, the worker its turns,
stages, LLM calls and heartbeats (a script's ``process_message`` counts in the script). The web
process serves its metrics, and the queue's depth and age computed at scrape time, at ``/metrics``
(``agentflow.web.metrics``); a worker serves its own on ``AGENTFLOW["METRICS"]["WORKER_PORT"]``
(``agentflow.worker``). With ``PROMETHEUS_MULTIPROC_DIR`` set (several web processes on one host),
``/metrics`` aggregates the processes sharing that folder.

Labels stay bounded: agent names, intent category names, a handful of outcomes, stages and kinds;
never a user, message or thread id.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

STAGES = ("embed", "thread", "classify", "retrieve", "llm", "store", "total")
# Turn outcomes: who produced the reply (the ``handled_by`` of the stored reply, without a handler's
# name), ``human`` for a message in a thread a human holds, ``failed`` for a turn that failed.
OUTCOMES = ("llm", "handler", "middleware", "clarify", "handoff", "offline", "fallback", "human", "failed")
_STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

TURNS = Counter(
    "agentflow_turns",
    "Turns finished, by agent, intent (empty when none) and outcome.",
    ["agent", "intent", "outcome"],
)
STAGE_SECONDS = Histogram(
    "agentflow_turn_stage_seconds",
    "Time spent in each stage of a turn: embed, thread, classify, retrieve, llm, store, and the total.",
    ["agent", "stage"],
    buckets=_STAGE_BUCKETS,
)
TASK_QUEUE_SECONDS = Histogram(
    "agentflow_task_queue_seconds",
    "Time a Celery task waited from being queued (or from the end of its countdown) until a worker"
    " thread started it, by task: the queue's share of a turn's latency.",
    ["task"],
    buckets=_STAGE_BUCKETS,
)
ESCALATIONS = Counter(
    "agentflow_escalations",
    "Turns handed to a human (an escalation opened or kept), by agent and intent.",
    ["agent", "intent"],
)
LLM_REQUESTS = Counter(
    "agentflow_llm_requests",
    "Calls to the LLM's Messages API, by model and result (ok, or the error kind).",
    ["model", "result"],
)
LLM_TOKENS = Counter(
    "agentflow_llm_tokens",
    "Tokens the LLM billed, by model and kind (input, output).",
    ["model", "kind"],
)
LLM_ERRORS = Counter(
    "agentflow_llm_errors",
    "LLM calls that failed, by model and kind (rate_limited, overloaded, server_error, client_error,"
    " connection).",
    ["model", "kind"],
)
WEBSOCKET_CONNECTIONS = Gauge(
    "agentflow_websocket_connections",
    "Open WebSocket connections of this process, by kind (chat, staff).",
    ["kind"],
    multiprocess_mode="livesum",
)
WORKER_HEARTBEATS = Counter(
    "agentflow_worker_heartbeats",
    "Worker heartbeats written to Redis (the readiness probe reads them).",
)
WORKER_HEARTBEAT_FAILURES = Counter(
    "agentflow_worker_heartbeat_failures",
    "Worker heartbeats that could not be written (Redis down).",
)
WORKER_LAST_HEARTBEAT = Gauge(
    "agentflow_worker_last_heartbeat_timestamp_seconds",
    "Unix time of this worker's last heartbeat written to Redis.",
    multiprocess_mode="max",
)


_children: dict[tuple[Any, ...], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, looked up once per process and label values.

    A turn records about ten samples; ``labels()`` checks and joins the values and takes the metric's
    lock on every call (3-4 us, several times that on a busy worker), though the labelled child it
    returns is the same object each time. Labels stay bounded (the module's docstring), so the cache
    does too; no metric here ever removes a child.
    """
    key = (metric, *labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


def stage_observe(agent: str, stage: str, seconds: float) -> None:
    """Record ``seconds`` spent in ``stage`` of one of ``agent``'s turns."""
    _child(STAGE_SECONDS, agent, stage).observe(max(0.0, seconds))


@contextmanager
def stage_timer(agent: str, stage: str) -> Iterator[None]:
    """Time the block as ``stage`` of one of ``agent``'s turns (also when it raises)."""
    started = time.perf_counter()
    try:
        yield
    finally:
        stage_observe(agent, stage, time.perf_counter() - started)


def turn_count(*, agent: str, intent: str | None, outcome: str, escalated: bool = False) -> None:
    """Count a finished (or failed) turn, and its escalation."""
    _child(TURNS, agent, intent or "", outcome).inc()
    if escalated:
        _child(ESCALATIONS, agent, intent or "").inc()


def llm_call_count(*, model: str, usage: dict[str, int] | None = None, error: str | None = None) -> None:
    """Count one Messages API call: its tokens, or its error kind."""
    if error is not None:
        _child(LLM_REQUESTS, model, error).inc()
        _child(LLM_ERRORS, model, error).inc()
        return
    _child(LLM_REQUESTS, model, "ok").inc()
    for kind in ("input", "output"):
        tokens = int((usage or {}).get(f"{kind}_tokens", 0))
        if tokens:
            _child(LLM_TOKENS, model, kind).inc(tokens)


def llm_error_kind(status: int | None) -> str:
    """The ``kind`` label of an LLM error from its HTTP status (None: no response)."""
    if status is None:
        return "connection"
    if status == 429:
        return "rate_limited"
    if status == 529:
        return "overloaded"
    return "server_error" if status >= 500 else "client_error"
