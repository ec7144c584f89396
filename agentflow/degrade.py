"""Graceful degradation when the LLM is down: a fallback reply, a hand-off, and a circuit breaker.

The breaker is shared by every process through the Django cache (Redis): a failure count per agent
over ``FallbackConfig.breaker_window_seconds`` and an open-until key. While it is open, turns skip the
LLM and get the fallback reply at once, so a dead provider is not hammered by every turn's retries.
After it closes, the first failure opens it again at once (``tripped``); a success clears it. If Redis
itself is unreachable the breaker counts nothing and stays closed (turns then call the LLM as usual).

Each process remembers for ``CLEAN_FOR`` that it found the breaker clean (no failures, not open, not
tripped): within that time its turns neither read the keys nor clear them after a success (two Redis
round trips a turn otherwise). A failure in this process forgets it at once; another process's
failures or opening are seen here at most ``CLEAN_FOR`` later.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

from django.core.cache import cache

from . import pipeline

if TYPE_CHECKING:
    from .agent import Agent

logger = logging.getLogger("agentflow.degrade")

CIRCUIT_OPEN_REASON = "LLM circuit breaker open"
OFFLINE_REASON = "offline mode: no LLM is configured, a human has to answer"


CLEAN_FOR = 1.0  # seconds

# Agent name -> time.monotonic() until which this process takes the breaker to be clean.
_clean_until: dict[str, float] = {}
_clean_lock = threading.Lock()


def _keys(agent: Agent) -> tuple[str, str, str]:
    base = f"llm-breaker:{agent.name}"
    return f"{base}:failures", f"{base}:open", f"{base}:tripped"


def _known_clean(agent: Agent) -> bool:
    return _clean_until.get(agent.name, 0.0) > time.monotonic()


def _set_clean(agent: Agent, clean: bool) -> None:
    with _clean_lock:
        if clean:
            _clean_until[agent.name] = time.monotonic() + CLEAN_FOR
        else:
            _clean_until.pop(agent.name, None)


def breaker_is_open(agent: Agent) -> bool:
    """Whether turns of ``agent`` should skip the LLM now."""
    if agent.offline or not agent.config.fallback_config.enabled:
        return False
    if _known_clean(agent):
        return False
    try:
        found = cache.get_many(list(_keys(agent)))
    except Exception as exc:  # Redis down: fail open (call the LLM), never fail the turn
        logger.warning("LLM circuit breaker unavailable: %s", exc)
        return False
    _set_clean(agent, not found)
    return _keys(agent)[1] in found


def breaker_failure(agent: Agent) -> bool:
    """Count a transient LLM failure; open the breaker at the threshold. True if it is open now."""
    cfg = agent.config.fallback_config
    if not cfg.enabled:
        return False
    failures_key, open_key, tripped_key = _keys(agent)
    _set_clean(agent, False)
    try:
        cache.add(failures_key, 0, timeout=cfg.breaker_window_seconds)
        failures = cache.incr(failures_key)
        if failures >= cfg.breaker_failures or cache.get(tripped_key) is not None:
            cache.set(open_key, 1, timeout=cfg.breaker_open_seconds)
            cache.set(tripped_key, 1, timeout=cfg.breaker_open_seconds + cfg.breaker_window_seconds)
            cache.delete(failures_key)
            logger.warning(
                "LLM circuit breaker of agent %s open for %s s after %s failures",
                agent.name,
                cfg.breaker_open_seconds,
                failures,
            )
            return True
    except Exception as exc:
        logger.warning("LLM circuit breaker unavailable: %s", exc)
    return False


def breaker_success(agent: Agent) -> None:
    """An LLM call succeeded: forget the failures and close the breaker."""
    if _known_clean(agent):
        return
    try:
        cache.delete_many(list(_keys(agent)))
        _set_clean(agent, True)
    except Exception as exc:
        logger.warning("LLM circuit breaker unavailable: %s", exc)


def fallback_outcome(agent: Agent, reason: str) -> pipeline.Outcome:
    """The reply a turn gets when the LLM is down, escalated to a human if so configured."""
    cfg = agent.config.fallback_config
    return pipeline.Outcome(
        text=cfg.reply,
        handled_by="fallback",
        escalated=cfg.escalate,
        escalation_reason=f"LLM unavailable: {reason}"[:500] if cfg.escalate else "",
    )


def offline_escalation(agent: Agent, outcome: pipeline.Outcome) -> None:
    """An offline reply promises that staff pick the message up: open that escalation.

    With ``fallback_config.escalate`` (the default); the thread then waits for a human.
    """
    if outcome.handled_by == "offline" and not outcome.escalated and agent.config.fallback_config.escalate:
        outcome.escalated = True
        outcome.escalation_reason = OFFLINE_REASON
