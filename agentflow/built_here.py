"""The agents ``build()`` made in this process, by name: the registry prefers them (a script's agent
runs its own turns and jobs with its handlers, middleware and tools)."""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .agent import Agent

_lock = threading.Lock()
_agents: dict[str, Agent] = {}


def remember(agent: Agent) -> None:
    """From now on this process runs ``agent.name`` with this very object."""
    with _lock:
        _agents[agent.name] = agent


def get(name: str) -> Agent | None:
    with _lock:
        return _agents.get(name)


def all_agents() -> list[Agent]:
    with _lock:
        return list(_agents.values())


def forget_all() -> None:
    with _lock:
        _agents.clear()
