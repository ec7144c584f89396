"""The agent the workers and the REST/WebSocket transports run, built from Django settings.

``AGENTFLOW["AGENT_FACTORY"]`` names an async (or plain) callable returning an ``Agent``; the
default below uses ``AGENTFLOW["CONFIG"]`` (YAML), the admin's active intent categories and the
Anthropic key from the environment. Projects with handlers and middleware point the setting at
their own factory built with ``AgentFrameworkBuilder``.

The built agent is cached per process; it reads the intent categories from the database on every
turn (intents.store), so an admin edit reaches every worker on its next message without a restart.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from django.conf import settings
from django.utils.module_loading import import_string

from .builder import AgentFrameworkBuilder
from .llm import AnthropicBackend

_lock = threading.Lock()
_cache: dict[str, tuple[Any, Any]] = {}


def anthropic_client_factory() -> Any:
    from anthropic import AsyncAnthropic

    kwargs: dict[str, Any] = {"api_key": settings.ANTHROPIC_API_KEY}
    if settings.ANTHROPIC_BASE_URL:
        kwargs["base_url"] = settings.ANTHROPIC_BASE_URL
    try:
        from anthropic import DefaultAioHttpClient

        kwargs["http_client"] = DefaultAioHttpClient()
    except ImportError:  # pragma: no cover - the aiohttp extra is in requirements.txt
        pass
    return AsyncAnthropic(**kwargs)


_backend: AnthropicBackend | None = None


def default_backend() -> AnthropicBackend | None:
    """One Anthropic backend per process, reused across agent rebuilds (it owns the HTTP clients)."""
    global _backend
    if not settings.ANTHROPIC_API_KEY:
        return None
    with _lock:
        if _backend is None:
            _backend = AnthropicBackend(client_factory=anthropic_client_factory)
        return _backend


def build_default_agent() -> Any:
    builder = AgentFrameworkBuilder()
    if settings.AGENTFLOW.get("CONFIG"):
        builder.with_config(settings.AGENTFLOW["CONFIG"])
    return builder.build_sync(default_backend())


def get_agent() -> Any:
    """The process's agent (sync: call from a worker thread or ``sync_to_async``, not a running loop).

    An async factory runs on its own thread and loop, so it never waits on the caller's
    thread-sensitive executor. Its LLM backend should make clients per loop
    (``AnthropicBackend(client_factory=...)``), as the default does.
    """
    factory_path = settings.AGENTFLOW["AGENT_FACTORY"]
    # Agents read their intent categories from the database on every turn (intents.store), so a
    # built agent stays valid across admin edits; it is rebuilt only when settings change.
    fingerprint = settings.AGENTFLOW.get("CONFIG")
    with _lock:
        cached = _cache.get(factory_path)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
    built = import_string(factory_path)()
    if inspect.isawaitable(built):
        with ThreadPoolExecutor(max_workers=1) as pool:
            built = pool.submit(asyncio.run, built).result()
    with _lock:
        _cache[factory_path] = (fingerprint, built)
    return built


def cached_agents() -> list[Any]:
    with _lock:
        return [agent for _, agent in _cache.values()]


def clear_agent_cache() -> None:
    """Forget built agents and the shared backend (settings such as the API key changed)."""
    global _backend
    with _lock:
        _cache.clear()
        _backend = None
