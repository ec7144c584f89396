"""HTTP to Django; WebSocket to AgentFlow's consumers (and the host's own, if it had any)."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hostproject.settings")
django_asgi_app = get_asgi_application()  # before importing consumers: it sets Django up

from channels.routing import ProtocolTypeRouter  # noqa: E402

from agentflow import drain  # noqa: E402
from agentflow.web.routing import websocket_application  # noqa: E402
from agentflow.web.serving import adapt_daphne  # noqa: E402

adapt_daphne()  # under daphne: SIGTERM drains; close codes 1012/1013 reach clients
application = drain.TrackRequests(
    ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application()})
)
