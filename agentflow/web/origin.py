"""The WebSocket handshake's ``Origin`` check, with an answer a browser client can act on.

Channels' ``OriginValidator`` rejects before accepting, which a browser sees as a bare HTTP 403.
This middleware accepts, sends an ``origin_not_allowed`` error frame and closes with 4403.

- The end-user chat (``/ws/chat/``) is authenticated by its token and embedded on host sites: it
  allows pages from ``ALLOWED_HOSTS`` and the origins in ``AGENTFLOW["WIDGET_ORIGINS"]``. A handshake
  without ``Origin`` comes from a program, not a browser, and is allowed (the token still decides).
- Every other WebSocket (the staff pages) is authenticated by the admin session cookie: only pages
  served from ``ALLOWED_HOSTS`` may open it, and ``Origin`` is required (cross-site WebSocket hijacking).
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from django.conf import settings
from django.http.request import split_domain_port, validate_host

CLOSE_ORIGIN_NOT_ALLOWED = 4403
WIDGET_PATHS = ("/ws/chat/",)


def _origin(scope: dict[str, Any]) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"origin":
            return value.decode("latin-1")
    return None


def origin_allowed(*, origin: str | None, path: str) -> bool:
    """Whether a WebSocket handshake from ``origin`` may open ``path``."""
    widget = path.startswith(WIDGET_PATHS)
    if origin is None:
        return widget
    parts = urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False  # "null" (sandboxed frames, file://) and anything odd
    host, _ = split_domain_port(parts.netloc)
    if validate_host(host, settings.ALLOWED_HOSTS):
        return True
    if not widget:
        return False
    from agentflow.conf import conf

    allowed = conf().WIDGET_ORIGINS
    return "*" in allowed or f"{parts.scheme}://{parts.netloc}".lower() in {
        o.lower().rstrip("/") for o in allowed
    }


class WebSocketOriginCheck:
    """ASGI middleware: refuse WebSocket handshakes from origins that may not open the path."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] != "websocket" or origin_allowed(origin=_origin(scope), path=scope.get("path", "")):
            return await self.app(scope, receive, send)
        event = await receive()
        if event["type"] != "websocket.connect":
            return None
        await send({"type": "websocket.accept"})
        await send(
            {
                "type": "websocket.send",
                "text": json.dumps(
                    {
                        "type": "error",
                        "code": "origin_not_allowed",
                        "message": "this page's origin may not open the chat; see AGENTFLOW_WIDGET_ORIGINS",
                    }
                ),
            }
        )
        await send({"type": "websocket.close", "code": CLOSE_ORIGIN_NOT_ALLOWED})
        return None
