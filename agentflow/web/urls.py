"""AgentFlow's HTTP routes: ``include("agentflow.web.urls")`` at the root of a project's URLconf.

- ``api/``: the REST API (``agentflow.web.api.api``), its OpenAPI docs at ``api/docs``, the health
  probes at ``api/health``, ``api/health/live`` and ``api/health/ready``;
- ``metrics``: Prometheus metrics (``agentflow.web.metrics``);
- ``demo/``: the chat widget's demo page (404 unless ``AGENTFLOW["DEMO_PAGE"]``).

Mount them at the root (``path("", include(...))``): the widget and the API's middleware expect
``/api/`` and ``/ws/chat/``.
"""

from __future__ import annotations

from django.urls import path

from conversations import views as conversations_views

from .api import api
from .metrics import metrics_view

urlpatterns = [
    path("api/", api.urls),
    path("metrics", metrics_view, name="agentflow-metrics"),
    path("demo/", conversations_views.demo_page, name="agentflow-demo"),
    path("demo/chat-token", conversations_views.demo_chat_token, name="agentflow-demo-chat-token"),
]
