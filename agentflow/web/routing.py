"""AgentFlow's WebSocket routes, for a project's ASGI application.

``websocket_urlpatterns`` are the end-user chat (``ws/chat/``) and the staff live pages
(``ws/staff/users/<pk>/``); ``websocket_application()`` wraps them in the ``Origin`` check
(``agentflow.web.origin``) a browser-facing deployment needs. A project with WebSocket routes of its
own can wrap ``URLRouter(its_patterns + websocket_urlpatterns)`` in ``WebSocketOriginCheck`` itself.
"""

from __future__ import annotations

from typing import Any

from channels.routing import URLRouter

from conversations.routing import websocket_urlpatterns

from .origin import WebSocketOriginCheck

__all__ = ["WebSocketOriginCheck", "websocket_application", "websocket_urlpatterns"]


def websocket_application() -> Any:
    """The ASGI application for the ``"websocket"`` key of a ``ProtocolTypeRouter``."""
    return WebSocketOriginCheck(URLRouter(websocket_urlpatterns))
