"""ASGI entry point: HTTP goes to Django, WebSocket to AgentFlow's consumers (``agentflow.web.routing``)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")

from agentflow.web.asgi import get_asgi_application

# Django's handler, with each request's thread kept for a later request (agentflow.web.asgi).
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from agentflow import drain  # noqa: E402
from agentflow.web.asgi import freeze_loaded_heap  # noqa: E402
from agentflow.web.routing import websocket_application  # noqa: E402
from agentflow.web.serving import adapt_daphne  # noqa: E402

# Under daphne: SIGTERM drains (REST waits answered, sockets closed with 1012) and 1011-1014 close codes
# reach clients (agentflow.web.serving).
adapt_daphne()
application = drain.TrackRequests(
    ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application()})
)
# What is loaded by now lives as long as the process: out of the collector's full passes
# (agentflow.web.asgi.freeze_loaded_heap).
freeze_loaded_heap()
