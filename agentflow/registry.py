"""Which agent a process runs for a name: the one registry every process resolves agents through.

An agent is looked up, in order:

1. **built in this process** by ``AgentFrameworkBuilder.build()`` (a script, a test, a factory):
   it is used as it is, with its handlers, middleware and tools;
2. **declared in settings**: ``AGENTFLOW["AGENTS"] = {"support": "myproject.agents:support_agent"}``
   names a callable returning a builder, an agent or an awaitable of either (the default agent,
   ``AGENTFLOW["DEFAULT_AGENT"]``, comes from ``AGENTFLOW["AGENT_FACTORY"]`` unless declared);
3. **its stored record**, when the record says nothing of it lives in code (no handlers, middleware
   or tools): rebuilt from the stored configuration and the database's intent categories.

Anything else raises ``AgentUnavailable``: a worker never runs a message with another agent's
settings. Built agents are cached per process, keyed by the record's ``version``, so a rebuild
elsewhere (new configuration, staff edits are read per turn anyway) is picked up on the next turn.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from django.utils.module_loading import import_string

from . import built_here
from .conf import conf
from .errors import AgentUnavailable, ConfigError

if TYPE_CHECKING:
    from .agent import Agent

logger = logging.getLogger("agentflow.registry")

_lock = threading.Lock()
_cache: dict[str, tuple[Any, Agent]] = {}  # name -> (key, agent) for declared / stored agents


def anthropic_client_factory() -> Any:
    from anthropic import AsyncAnthropic

    from .conf import anthropic_api_key, anthropic_base_url

    kwargs: dict[str, Any] = {"api_key": anthropic_api_key()}
    if anthropic_base_url():
        kwargs["base_url"] = anthropic_base_url()
    try:
        from anthropic import DefaultAioHttpClient

        from .llm import llm_tls_context

        kwargs["http_client"] = DefaultAioHttpClient(verify=llm_tls_context())
    except ImportError:  # pragma: no cover - the aiohttp extra is in requirements.txt
        pass
    return AsyncAnthropic(**kwargs)


_backend: Any = None


def default_backend() -> Any:
    """One Anthropic backend per process, shared by the agents it builds (it owns the HTTP clients).

    ``None`` (offline mode) without ``ANTHROPIC_API_KEY``.
    """
    global _backend
    from .conf import anthropic_api_key
    from .llm import AnthropicBackend

    if not anthropic_api_key():
        return None
    with _lock:
        if _backend is None:
            _backend = AnthropicBackend(client_factory=anthropic_client_factory)
        return _backend


def build_default_agent() -> Any:
    """The default agent's factory: ``AGENTFLOW["CONFIG"]`` (YAML), the admin's categories, the env key."""
    from .builder import AgentFrameworkBuilder

    builder = AgentFrameworkBuilder().with_config({"name": conf().DEFAULT_AGENT})
    path = conf().CONFIG
    if path:
        builder.with_config(path)  # its own name, if it gives one, must match AGENTFLOW_DEFAULT_AGENT
    return builder


def _materialise(made: Any, *, name: str, origin: str) -> Agent:
    from .agent import Agent
    from .builder import AgentFrameworkBuilder

    if inspect.isawaitable(made):
        with ThreadPoolExecutor(max_workers=1) as pool:
            made = pool.submit(asyncio.run, made).result()  # type: ignore[arg-type]
    if isinstance(made, AgentFrameworkBuilder):
        made = made.build_sync(default_backend(), name=name, origin=origin, local=False)
    if not isinstance(made, Agent):
        raise ConfigError(
            f"{origin} returned {type(made).__name__}; expected an AgentFrameworkBuilder or an Agent"
        )
    # A factory that called build() itself made a script's agent; declared, its jobs go to the workers.
    made.runs_jobs_inline = False
    if made.name != name:
        raise ConfigError(
            f"{origin} built an agent named {made.name!r}; AGENTFLOW['AGENTS'] declares it as {name!r}"
        )
    return made


def agent_for(name: str, *, version: int | None = None) -> Agent:
    """The agent this process runs for ``name`` (sync: call from a worker thread or ``sync_to_async``).

    Args:
        name: the agent's name.
        version: the record's version as the caller read it (with the message), so a cached agent
            built from an older stored configuration is rebuilt without another query.

    Raises:
        AgentUnavailable: the agent is neither built here, declared in settings, nor rebuildable from
            its stored record; the reason says which and what to do.
    """
    local = built_here.get(name)
    if local is not None:
        return local
    declared = conf().agent_paths().get(name)
    with _lock:
        cached = _cache.get(name)
    if declared is not None:
        key: Any = ("declared", declared, conf().CONFIG)
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            factory = import_string(declared.replace(":", "."))
        except ImportError as exc:
            raise AgentUnavailable(f"agent {name!r}: cannot import {declared!r} ({exc})") from None
        agent = _materialise(factory(), name=name, origin=declared)
    else:
        from conversations.agents import agent_get

        from .errors import NotFound

        if cached is not None and version is not None and cached[0] == ("stored", version):
            return cached[1]
        try:
            record = agent_get(name=name)
        except NotFound:
            raise AgentUnavailable(f"agent {name!r} is not registered in this deployment") from None
        key = ("stored", record.version)
        if cached is not None and cached[0] == key:
            return cached[1]
        if not record.portable:
            parts = ", ".join(k for k in ("handlers", "middleware", "tools") if record.code_parts.get(k))
            raise AgentUnavailable(
                f"agent {name!r} has {parts} defined in code that this process cannot load; declare it in "
                f"AGENTFLOW_AGENTS (a dotted path to the function that builds it) so every process can"
            )
        from .builder import AgentFrameworkBuilder

        builder = AgentFrameworkBuilder().with_config({**record.config, "name": name})
        agent = builder.build_sync(default_backend(), name=name, local=False, stored=record)
    with _lock:
        _cache[name] = (key, agent)
    return agent


def agent_cached(name: str, *, version: int) -> Agent | None:
    """The agent this process already runs for ``name`` at stored version ``version``, or None: no
    query, no build (a queued turn that names its agent and version, ``conversations.tasks``).

    None when the agent is not built here yet, when this process's copy is of another version, or
    when its declaration changed since it was built: the caller then reads the message's agent.
    """
    local = built_here.get(name)
    if local is not None:
        return local if local.version == version else None
    declared = conf().agent_paths().get(name)
    with _lock:
        cached = _cache.get(name)
    if cached is None:
        return None
    key, agent = cached
    expected: Any = ("declared", declared, conf().CONFIG) if declared is not None else ("stored", version)
    return agent if key == expected and agent.version == version else None


def default_agent() -> Agent:
    """The deployment's default agent (``AGENTFLOW["DEFAULT_AGENT"]``), as the old single-agent paths use."""
    return agent_for(conf().DEFAULT_AGENT)


def cached_agents() -> list[Agent]:
    with _lock:
        return [*built_here.all_agents(), *(agent for _, agent in _cache.values())]


def clear_agent_cache() -> None:
    """Forget built agents and the shared backend (settings such as the API key changed; tests)."""
    global _backend
    built_here.forget_all()
    with _lock:
        _cache.clear()
        _backend = None
