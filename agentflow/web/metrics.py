"""``/metrics``: the web process's Prometheus metrics, and the turn queue's depth and age.

Access (``AGENTFLOW["METRICS"]``): a client in ``ALLOWED_IPS`` (loopback by default; the socket's
address, never a forwarded header), a request with ``Authorization: Bearer <TOKEN>``, or logged-in
staff (``STAFF``). Anyone else gets 403; with ``ENABLED`` off, 404.

The queue gauges are computed at scrape time from PostgreSQL (one aggregate over a partial index,
``conversations.selectors.messages_unanswered_by_agent``), so every web process reports the same
numbers; take them from one (``max`` or ``avg`` in PromQL). With ``PROMETHEUS_MULTIPROC_DIR`` set,
the process metrics are those of every process writing to that folder.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
from collections.abc import Iterator
from typing import Any

from django.http import Http404, HttpRequest, HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from agentflow.conf import MetricsSettings, conf
from conversations.selectors import messages_unanswered_by_agent


class QueueCollector(Collector):
    """``agentflow_queue_messages`` and ``agentflow_queue_oldest_age_seconds``, read at scrape time."""

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily(
            "agentflow_queue_messages",
            "User messages waiting for their turn, by agent and status (pending: queued; processing: running).",
            labels=["agent", "status"],
        )
        age = GaugeMetricFamily(
            "agentflow_queue_oldest_age_seconds",
            "Age of the oldest user message waiting for its turn, by agent and status.",
            labels=["agent", "status"],
        )
        now = timezone.now()
        for row in messages_unanswered_by_agent():
            labels = [row["agent"], row["status"]]
            depth.add_metric(labels, row["count"])
            age.add_metric(labels, max(0.0, (now - row["oldest"]).total_seconds()))
        yield depth
        yield age


def _process_registry() -> Any:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return registry
    return REGISTRY


def _ip_allowed(address: str, allowed: list[str]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    for entry in allowed:
        try:
            if ip in ipaddress.ip_network(entry, strict=False):
                return True
        except ValueError:
            continue
    return False


def metrics_allowed(request: HttpRequest, settings: MetricsSettings) -> bool:
    """Whether ``request`` may read the metrics (see the module docstring)."""
    header = request.headers.get("Authorization", "")
    if settings.TOKEN and header.startswith("Bearer "):
        return hmac.compare_digest(header[7:].encode(), settings.TOKEN.encode())
    if _ip_allowed(request.META.get("REMOTE_ADDR", ""), settings.ALLOWED_IPS):
        return True
    user = getattr(request, "user", None)
    return bool(settings.STAFF and user is not None and user.is_active and user.is_staff)


@never_cache
@require_GET
def metrics_view(request: HttpRequest) -> HttpResponse:
    settings = conf().METRICS
    if not settings.ENABLED:
        raise Http404("metrics are off (AGENTFLOW_METRICS=false)")
    if not metrics_allowed(request, settings):
        return HttpResponse(
            "metrics: allowed from AGENTFLOW_METRICS_ALLOWED_IPS, with the bearer token or for staff\n",
            status=403,
            content_type="text/plain; charset=utf-8",
        )
    body = generate_latest(_process_registry())
    if settings.QUEUE:
        queue = CollectorRegistry(auto_describe=False)
        queue.register(QueueCollector())
        body += generate_latest(queue)
    return HttpResponse(body, content_type=CONTENT_TYPE_LATEST)
