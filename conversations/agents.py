"""The agent records: register, read, and the cheap per-agent limits transports need.

``build()`` registers an agent by name (``agent_register``); every process then rebuilds it from the
registry of dotted paths or from its stored configuration (``agentflow.registry``). Transports read
an agent's limits with ``agent_settings`` (its id and version read; the limits of each version kept).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from django.db import transaction
from django.db.models import QuerySet
from django.utils import timezone

from agentflow.errors import InvalidInput, NotFound
from agentflow.prepared import PreparedQuery

from .models import AGENT_NAME_PATTERN, Agent
from .services import AgentChanged, Received, message_receive

_NAME_RE = re.compile(AGENT_NAME_PATTERN)


def clean_agent_name(name: object) -> str:
    """An agent name as used in URLs, tokens and settings.

    Raises:
        InvalidInput: not 1-100 letters, digits, ``_``, ``-`` or ``.`` (starting with a letter or digit).
    """
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise InvalidInput(
            "agent must be 1-100 letters, digits, '_', '-' or '.', starting with a letter or digit",
            field="agent",
        )
    return name


def agent_get(*, name: str) -> Agent:
    """The agent record named ``name``.

    Raises:
        NotFound: no agent of that name is registered.
    """
    found = _AGENT_BY_NAME.run(name=clean_agent_name(name))
    if not found:
        raise NotFound(f"agent {name!r} not found")
    return found[0]


def _agent_by_name(*, name: str) -> QuerySet[Agent]:
    return Agent.objects.filter(name=name)[:1]  # names are unique


# Read for every message a transport accepts (its agent's limits): compiled once per connection.
_AGENT_BY_NAME = PreparedQuery(_agent_by_name)


def agent_get_or_create(*, name: str) -> Agent:
    """The agent record named ``name``, created empty (default configuration) if missing."""
    agent, _ = Agent.objects.get_or_create(name=clean_agent_name(name), defaults={"origin": "created"})
    return agent


def agent_register(
    *,
    name: str,
    config: Mapping[str, Any],
    fingerprint: str,
    code_parts: Mapping[str, Any],
    origin: str,
    sources: Mapping[str, str] | None = None,
) -> Agent:
    """Create or update an agent record from a validated build; ``version`` goes up on any change.

    Safe from several processes at once (a row lock): the same definition registered twice leaves
    one record and one version.
    """
    now = timezone.now()
    with transaction.atomic():
        agent, created = Agent.objects.select_for_update().get_or_create(
            name=clean_agent_name(name),
            defaults={
                "config": dict(config),
                "sources": dict(sources or {}),
                "fingerprint": fingerprint,
                "code_parts": dict(code_parts),
                "origin": origin,
                "last_built_at": now,
            },
        )
        if created:
            return agent
        changed = (
            agent.config != dict(config)
            or agent.sources != dict(sources or {})
            or agent.fingerprint != fingerprint
            or agent.code_parts != dict(code_parts)
        )
        agent.last_built_at = now
        fields = ["last_built_at"]
        if changed:
            agent.config, agent.fingerprint, agent.code_parts = dict(config), fingerprint, dict(code_parts)
            agent.sources = dict(sources or {})
            agent.version += 1
            fields += ["config", "sources", "fingerprint", "code_parts", "version", "updated_at"]
        if origin and agent.origin != origin and (origin != "script" or not agent.origin):
            agent.origin = origin  # a declared dotted path is not overwritten by a script's build
            fields.append("origin")
        agent.save(update_fields=fields)
        return agent


@dataclass(frozen=True)
class AgentSettings:
    """What a transport needs to accept a message for an agent, read from its stored configuration."""

    id: int
    name: str
    version: int
    ttl_seconds: int
    max_message_chars: int
    messages_per_minute: int
    burst: int

    @classmethod
    def of(cls, *, id: int, name: str, version: int, config: Any) -> AgentSettings:
        """The limits of a validated ``AgentFrameworkConfig``."""
        return cls(
            id=id,
            name=name,
            version=version,
            ttl_seconds=config.session_config.ttl_seconds,
            max_message_chars=config.input_config.max_message_chars,
            messages_per_minute=config.rate_limit_config.messages_per_minute,
            burst=config.rate_limit_config.burst,
        )


def _agent_version(*, name: str) -> QuerySet[Agent, Any]:
    return Agent.objects.filter(name=name).values("id", "version", "updated_at")[:1]


# Read for every message a transport accepts: the agent's id, version and when it last changed
# (compiled once).
_AGENT_VERSION = PreparedQuery(_agent_version)

# The limits of each agent version this process has read, by (id, version, the record's
# ``updated_at``, this process's AGENT_* variables). A version is never changed once stored
# (``agent_register`` increments it with any change of configuration), so an entry never goes
# stale; a new version is a new key. ``updated_at`` tells apart a version number used twice (a
# database restored from a backup, a registration rolled back).
_SettingsKey = tuple[int, int, Any, tuple[tuple[str, str], ...]]
_settings_by_version: dict[_SettingsKey, AgentSettings] = {}
_SETTINGS_KEPT = 256


def _env_key() -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("AGENT_")))


def _settings_read(*, name: str, env: tuple[tuple[str, str], ...]) -> AgentSettings:
    """The limits from the agent's whole record (its stored configuration validated)."""
    from agentflow.conf import conf
    from agentflow.config import AgentFrameworkConfig, deep_merge, env_overrides

    try:
        agent = agent_get(name=name)
    except NotFound:
        if name not in conf().agent_paths():
            raise
        agent = agent_get_or_create(name=name)  # declared in settings, not built anywhere yet
    # The stored configuration is what the last build resolved; this process's AGENT_* variables
    # still win over it, as they would in a build here (one precedence everywhere).
    env_data, _ = env_overrides(dict(env))
    config = AgentFrameworkConfig.model_validate(deep_merge({**agent.config, "name": agent.name}, env_data))
    found = AgentSettings.of(id=agent.pk, name=agent.name, version=agent.version, config=config)
    if len(_settings_by_version) >= _SETTINGS_KEPT:
        _settings_by_version.clear()
    _settings_by_version[(found.id, found.version, agent.updated_at, env)] = found
    return found


def agent_settings(*, name: str) -> AgentSettings:
    """The limits of agent ``name``: its id and version read (one compiled query), the limits of that
    version from this process's memory, or from the whole record the first time (no agent is built).

    An agent declared in ``AGENTFLOW["AGENTS"]`` that no process has built yet gets its record now,
    with the default configuration until it is built.

    Raises:
        NotFound: no agent of that name is registered or declared.
    """
    name = clean_agent_name(name)
    env = _env_key()
    rows = _AGENT_VERSION.run(name=name)
    if rows:
        row = rows[0]
        found = _settings_by_version.get((row["id"], row["version"], row["updated_at"], env))
        if found is not None:
            return found
    return _settings_read(name=name, env=env)


def message_accept(
    *, limits: AgentSettings, user_id: str, message: Any, client_message_id: Any = None
) -> Received:
    """Validate and store an incoming user message for the agent of ``limits`` (pending its turn).

    The one way every entry point (in-process, REST, WebSocket) accepts a message. ``limits`` are
    used as given (a REST request has just read them; an in-process agent uses its own
    configuration); ``message_accept_held`` checks them against the stored version first.

    Raises:
        InvalidInput, RateLimited: nothing was stored.
    """
    return _receive(limits, user_id=user_id, message=message, client_message_id=client_message_id)


def _receive(
    limits: AgentSettings,
    *,
    user_id: str,
    message: Any,
    client_message_id: Any,
    agent_version: int | None = None,
    shown_by: str | None = None,
) -> Received:
    """``message_receive`` under ``limits`` (checked against the stored ``agent_version`` if given)."""
    return message_receive(
        agent_id=limits.id,
        user_id=user_id,
        content=message,
        client_message_id=client_message_id,
        ttl_seconds=limits.ttl_seconds,
        max_chars=limits.max_message_chars,
        rate_per_minute=limits.messages_per_minute,
        rate_burst=limits.burst,
        agent_version=agent_version,
        shown_by=shown_by,
    )


@dataclass
class HeldLimits:
    """An agent's limits held across messages (a chat connection's, read when it opened); replaced
    in place by ``message_accept_held`` when another process published a new version."""

    limits: AgentSettings


def message_accept_held(
    *,
    held: HeldLimits,
    user_id: str,
    message: Any,
    client_message_id: Any = None,
    shown_by: str | None = None,
) -> Received:
    """``message_accept`` with limits the caller holds across messages: the message's one read also
    checks the agent's stored version; when another process published a new version, the limits are
    read again, replace ``held.limits`` (kept even when the message is then refused) and the message
    is accepted under them. ``shown_by``: see ``services.message_receive``.

    Raises:
        InvalidInput, RateLimited: nothing was stored.
        NotFound: the agent is gone.
    """
    for _ in range(3):
        limits = held.limits
        try:
            return _receive(
                limits,
                user_id=user_id,
                message=message,
                client_message_id=client_message_id,
                agent_version=limits.version,
                shown_by=shown_by,
            )
        except AgentChanged:
            held.limits = agent_settings(name=limits.name)  # NotFound when the agent is gone
    # Published again at every attempt: accept under the latest limits read, unchecked.
    return _receive(
        held.limits, user_id=user_id, message=message, client_message_id=client_message_id, shown_by=shown_by
    )
