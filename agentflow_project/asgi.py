"""ASGI entry point: HTTP goes to Django, WebSocket to AgentFlow's consumers (``agentflow.web.routing``)."""

import os

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")

from agentflow.web.asgi import get_asgi_application

# Django's handler, with each request's thread kept for a later request (agentflow.web.asgi).
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402

from agentflow.web.routing import websocket_application  # noqa: E402

application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application()})
