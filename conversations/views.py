"""The demo page: the chat widget embedded the way a host site embeds it, for trying AgentFlow out.

``/demo/`` is a sample host page carrying the widget's ``<script>`` tag. ``/demo/chat-token`` plays the
host backend's part: it gives each browser its own demo end user (``demo-<random>``, kept in the
Django session) and returns a chat token for it. Both answer 404 when ``AGENTFLOW_DEMO_PAGE`` is off.
"""

from __future__ import annotations

import re
import secrets

from django.contrib.sessions.backends.base import SessionBase
from django.http import Http404, HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from agentflow.conf import conf
from agentflow.errors import InvalidInput, NotFound

from .agents import agent_settings
from .chat_tokens import chat_token_create

DEMO_USER_SESSION_KEY = "agentflow_demo_user"
_DEMO_USER_ID = re.compile(r"demo-[0-9a-f]{16}")


def _require_demo_page() -> None:
    if not conf().DEMO_PAGE:
        raise Http404("the demo page is off (AGENTFLOW_DEMO_PAGE=false)")


def demo_user_id(session: SessionBase) -> str:
    """This browser's demo end user: the id kept in its session, or a new ``demo-<random>`` one."""
    user_id = session.get(DEMO_USER_SESSION_KEY)
    if not isinstance(user_id, str) or not _DEMO_USER_ID.fullmatch(user_id):
        user_id = f"demo-{secrets.token_hex(8)}"
        session[DEMO_USER_SESSION_KEY] = user_id
    return user_id


@require_GET
def demo_page(request: HttpRequest) -> HttpResponse:
    """The sample host page; ``?agent=<name>`` puts ``data-agent`` on the widget's tag."""
    _require_demo_page()
    agent = request.GET.get("agent") or ""
    try:
        agent = agent_settings(name=agent).name if agent else ""
    except (InvalidInput, NotFound) as exc:
        raise Http404(str(exc)) from None
    return render(request, "agentflow/demo.html", {"agent": agent})


@never_cache
@require_GET
def demo_chat_token(request: HttpRequest) -> JsonResponse:
    """``{"token", "expires_in", "websocket_path", "agent"}`` for this browser's demo user (what a host
    backend returns); ``?agent=<name>`` picks the agent (the widget's ``data-agent``), else the default."""
    _require_demo_page()
    user_id = demo_user_id(request.session)
    try:
        agent = agent_settings(name=request.GET.get("agent") or conf().DEFAULT_AGENT).name
    except (InvalidInput, NotFound) as exc:
        return JsonResponse({"error": {"code": exc.code, "message": str(exc), "field": "agent"}}, status=404)
    return JsonResponse(
        {
            "token": chat_token_create(external_id=user_id, agent=agent),
            "expires_in": conf().CHAT_TOKEN_TTL_SECONDS,
            "websocket_path": "/ws/chat/",
            "agent": agent,
        }
    )
