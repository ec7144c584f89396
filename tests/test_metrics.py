"""Prometheus metrics: ``/metrics`` scraped after real turns (REST -> Celery worker -> fake LLM), the
queue computed at scrape time, WebSocket connections, access rules, and the worker's own port."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections import defaultdict
from datetime import timedelta
from typing import Any

import pytest
from channels.testing import WebsocketCommunicator
from django.contrib.auth.models import User
from django.test import AsyncClient, Client
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from agentflow.metrics import STAGES
from agentflow.testing.fake_anthropic import FakeReply
from agentflow.worker import WorkerMetricsServer, _due
from agentflow_project.asgi import application
from conversations.chat_tokens import chat_token_create
from conversations.models import Message
from tests.conftest import ORIGIN
from tests.conversations.factories import MessageFactory, default_agent_row
from tests.faults import unused_port

pytestmark = [pytest.mark.django_db(transaction=True)]

MODEL = "claude-sonnet-5-5"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _parse(text: str) -> Samples:
    samples: Samples = defaultdict(float)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


async def _scrape(client: AsyncClient) -> Samples:
    response = await client.get("/metrics")
    assert response.status_code == 200, response.content
    assert response["Content-Type"].startswith("text/plain; version=")
    return _parse(response.content.decode())


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return round(_value(after, name, **labels) - _value(before, name, **labels), 6)


@pytest.mark.integration
async def test_metrics_after_turns_count_turns_stages_tokens_and_errors(celery_worker, api_key, fake_llm):
    client = AsyncClient()
    before = await _scrape(client)
    replies = ["First answer.", "A second, longer answer for the tokens.", "Third."]
    fake_llm.enqueue(*(FakeReply(text=r) for r in replies))
    bodies = []
    for i, _ in enumerate(replies):
        response = await client.post(
            f"/api/users/metrics-{i}/messages",
            {"message": f"question number {i}"},
            content_type="application/json",
            headers={"X-API-Key": api_key},
        )
        assert response.status_code == 200, response.content
        bodies.append(response.json())
    # A client error from the LLM (400: not retried) fails the fourth turn.
    fake_llm.enqueue(FakeReply(status=400, error_type="invalid_request_error", error_message="bad"))
    failed = await client.post(
        "/api/users/metrics-3/messages",
        {"message": "this one fails"},
        content_type="application/json",
        headers={"X-API-Key": api_key},
    )
    assert failed.json()["status"] == "failed"
    after = await _scrape(client)

    intents = {b["intent"] or "" for b in bodies}
    assert len(intents) == 1
    intent = intents.pop()
    turns = "agentflow_turns_total"
    assert _delta(before, after, turns, agent="agentflow", intent=intent, outcome="llm") == 3
    assert _delta(before, after, turns, agent="agentflow", intent="", outcome="failed") == 1
    for stage in ("embed", "thread", "classify", "retrieve"):  # every turn, the failed one too
        assert (
            _delta(before, after, "agentflow_turn_stage_seconds_count", agent="agentflow", stage=stage) == 4
        )
    for stage in ("llm", "store", "total"):  # the turns that stored a reply
        assert (
            _delta(before, after, "agentflow_turn_stage_seconds_count", agent="agentflow", stage=stage) == 3
        )
    stored = {
        m.reply_to_id: m.latency_ms
        async for m in Message.objects.filter(reply_to_id__in=[b["message_id"] for b in bodies])
    }
    total = _delta(before, after, "agentflow_turn_stage_seconds_sum", agent="agentflow", stage="total")
    assert total >= sum(stored.values()) / 1000  # the total stage ends after the stored latency
    assert _delta(before, after, "agentflow_llm_requests_total", model=MODEL, result="ok") == 3
    assert _delta(before, after, "agentflow_llm_requests_total", model=MODEL, result="client_error") == 1
    assert _delta(before, after, "agentflow_llm_errors_total", model=MODEL, kind="client_error") == 1
    for kind in ("input", "output"):
        billed = sum(b["usage"][f"{kind}_tokens"] for b in bodies)
        assert billed > 0
        assert _delta(before, after, "agentflow_llm_tokens_total", model=MODEL, kind=kind) == billed
    # Each turn's task waited in the queue (from its publish to a worker thread) once: four tasks, no retry.
    task = "agentflow.process_turn"
    assert _delta(before, after, "agentflow_task_queue_seconds_count", task=task) == 4
    waited = _delta(before, after, "agentflow_task_queue_seconds_sum", task=task)
    assert 0 < waited < 40  # an idle worker: seconds at most, never the Unix time of the publish
    # Every stage's histogram has the same buckets; none is left undeclared.
    assert set(STAGES) == {"embed", "thread", "classify", "retrieve", "llm", "store", "total"}
    # The worker's heartbeat thread beats (every AGENTFLOW_WORKER_HEARTBEAT_SECONDS).
    assert _value(after, "agentflow_worker_heartbeats_total") >= 1
    last = _value(after, "agentflow_worker_last_heartbeat_timestamp_seconds")
    assert 0 <= timezone.now().timestamp() - last <= 30


@pytest.mark.integration
async def test_an_offline_turn_counts_as_offline_and_escalated(celery_worker, api_key):
    client = AsyncClient()
    before = await _scrape(client)
    response = await client.post(
        "/api/users/metrics-offline/messages",
        {"message": "is anyone there?"},
        content_type="application/json",
        headers={"X-API-Key": api_key},
    )
    body = response.json()
    assert (body["status"], body["offline"], body["escalated"]) == ("done", True, True)
    after = await _scrape(client)
    intent = body["intent"] or ""
    assert (
        _delta(before, after, "agentflow_turns_total", agent="agentflow", intent=intent, outcome="offline")
        == 1
    )
    assert _delta(before, after, "agentflow_escalations_total", agent="agentflow", intent=intent) == 1
    assert _delta(before, after, "agentflow_turn_stage_seconds_count", agent="agentflow", stage="llm") == 0
    assert _delta(before, after, "agentflow_turn_stage_seconds_count", agent="agentflow", stage="total") == 1


def test_queue_depth_and_age_are_read_from_postgresql_at_scrape_time() -> None:
    agent = default_agent_row()
    old = MessageFactory(status=Message.Status.PENDING, thread__session__user__agent=agent)
    MessageFactory(status=Message.Status.PENDING, thread=old.thread)
    MessageFactory(status=Message.Status.PROCESSING, thread=old.thread)
    MessageFactory(status=Message.Status.DONE, thread=old.thread)
    MessageFactory(status=Message.Status.PENDING, role=Message.Role.ASSISTANT, thread=old.thread)
    Message.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(seconds=90))

    samples = _parse(Client().get("/metrics").content.decode())

    assert _value(samples, "agentflow_queue_messages", agent="agentflow", status="pending") == 2
    assert _value(samples, "agentflow_queue_messages", agent="agentflow", status="processing") == 1
    age = _value(samples, "agentflow_queue_oldest_age_seconds", agent="agentflow", status="pending")
    assert 90 <= age < 120
    assert _value(samples, "agentflow_queue_oldest_age_seconds", agent="agentflow", status="processing") < 30
    Message.objects.filter(status__in=["pending", "processing"]).update(status=Message.Status.DONE)
    samples = _parse(Client().get("/metrics").content.decode())
    assert not [k for k in samples if k[0] == "agentflow_queue_messages"]


async def test_websocket_connections_are_counted_while_open() -> None:
    def chat() -> float:
        return _value(
            _parse(Client().get("/metrics").content.decode()), "agentflow_websocket_connections", kind="chat"
        )

    from asgiref.sync import sync_to_async

    await sync_to_async(default_agent_row)()
    start = await sync_to_async(chat)()
    token = chat_token_create(external_id="ws-metrics", agent="agentflow")
    communicators = [
        WebsocketCommunicator(application, f"/ws/chat/?token={token}", headers=[ORIGIN]) for _ in range(2)
    ]
    for communicator in communicators:
        connected, _ = await communicator.connect()
        assert connected
        assert (await communicator.receive_json_from())["type"] == "ready"
    assert await sync_to_async(chat)() == start + 2
    refused = WebsocketCommunicator(application, "/ws/chat/?token=bad", headers=[ORIGIN])
    await refused.connect()
    assert (await refused.receive_json_from())["code"] == "unauthorized"
    assert await sync_to_async(chat)() == start + 2  # a refused connection is not counted
    await refused.disconnect()
    for communicator in communicators:
        await communicator.disconnect()
    assert await sync_to_async(chat)() == start


def _metrics_settings(settings: Any, **values: Any) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "METRICS": {**settings.AGENTFLOW["METRICS"], **values}}


@pytest.mark.parametrize(
    ("values", "headers", "remote", "status"),
    [
        ({}, {}, "127.0.0.1", 200),
        ({}, {}, "10.1.2.3", 403),
        ({"ALLOWED_IPS": ["10.0.0.0/8"]}, {}, "10.1.2.3", 200),
        ({"ALLOWED_IPS": ["not-a-network", "::1"]}, {}, "127.0.0.1", 403),
        ({"TOKEN": "s3cret-token"}, {"Authorization": "Bearer s3cret-token"}, "10.1.2.3", 200),
        ({"TOKEN": "s3cret-token"}, {"Authorization": "Bearer wrong"}, "10.1.2.3", 403),
        ({"TOKEN": "s3cret-token"}, {"Authorization": "Bearer wrong"}, "127.0.0.1", 403),
        ({"TOKEN": "s3cret-token"}, {"Authorization": "Basic czNjcmV0"}, "10.1.2.3", 403),
        ({"TOKEN": ""}, {"Authorization": "Bearer "}, "10.1.2.3", 403),
        ({"ENABLED": False}, {}, "127.0.0.1", 404),
    ],
)
def test_metrics_access(
    settings: Any, values: dict[str, Any], headers: dict[str, str], remote: str, status: int
):
    _metrics_settings(settings, **values)
    response = Client(REMOTE_ADDR=remote).get("/metrics", headers=headers)
    assert response.status_code == status
    if status == 200:
        assert b"agentflow_turns_total" in response.content or b"# HELP agentflow_turns" in response.content
    else:
        assert b"agentflow_" not in response.content


def test_metrics_for_staff_only_when_allowed(settings: Any) -> None:
    staff = User.objects.create_user("ops", password="pw-ops-123456", is_staff=True)
    client = Client(REMOTE_ADDR="10.1.2.3")
    client.force_login(staff)
    assert client.get("/metrics").status_code == 200
    _metrics_settings(settings, STAFF=False)
    assert client.get("/metrics").status_code == 403
    _metrics_settings(settings, STAFF=True)
    User.objects.filter(pk=staff.pk).update(is_staff=False)
    assert client.get("/metrics").status_code == 403


def test_metrics_is_read_only() -> None:
    assert Client().post("/metrics").status_code == 405


def test_a_countdown_is_not_counted_as_waiting_in_the_queue() -> None:
    queued = 1_800_000_000.0
    assert _due(queued, None) == queued
    assert _due(queued, "2027-01-15T08:00:05+00:00") == 1_800_000_005.0  # queued with a 5 s countdown
    assert _due(queued, "2027-01-15T07:59:00+00:00") == queued  # an eta already past when queued
    assert _due(queued, "not a time") == queued


def test_the_worker_serves_its_own_metrics_on_its_port(settings: Any) -> None:
    port = unused_port()
    _metrics_settings(settings, WORKER_PORT=port, WORKER_ADDRESS="127.0.0.1")
    step = WorkerMetricsServer(parent=None)
    step.start(parent=None)
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
        names = {family.name for family in text_string_to_metric_families(text)}
        assert {"agentflow_turns", "agentflow_turn_stage_seconds", "agentflow_worker_heartbeats"} <= names
        assert "agentflow_queue_messages" not in names  # the queue is the web process's
    finally:
        step.stop(parent=None)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)


def test_the_worker_serves_nothing_without_a_port(settings: Any) -> None:
    _metrics_settings(settings, WORKER_PORT=0)
    step = WorkerMetricsServer(parent=None)
    step.start(parent=None)
    assert step._server is None


def test_the_grafana_dashboard_parses_and_uses_only_metrics_that_exist() -> None:
    import json
    import re
    from pathlib import Path

    from prometheus_client.metrics import MetricWrapperBase

    from agentflow import metrics
    from agentflow.web.metrics import QueueCollector

    dashboard = json.loads(
        (Path(__file__).resolve().parents[1] / "deploy/grafana/agentflow.json").read_text()
    )
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    used = {name for expr in exprs for name in re.findall(r"\bagentflow_[a-z_]+\b", expr)}
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"], "gauge": [""]}
    families = [
        family
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
        for family in value.describe()
    ] + list(QueueCollector().collect())
    exposed = {family.name + suffix for family in families for suffix in suffixes[family.type]}
    assert len(dashboard["panels"]) == 10
    assert len(used) == 11
    assert used <= exposed, used - exposed
    assert all(p["datasource"]["uid"] == "${datasource}" for p in dashboard["panels"])
