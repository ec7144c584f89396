"""Graceful degradation when the LLM is down: a fallback reply, a hand-off, and a circuit breaker.

The breaker is shared by every process through the Django cache (Redis): a failure count per agent
over ``FallbackConfig.breaker_window_seconds`` and an open-until key. While it is open, turns skip the
LLM and get the fallback reply at once, so a dead provider is not hammered by every turn's retries.
After it closes, the first failure opens it again at once (``tripped``); a success clears it. If Redis
itself is unreachable the breaker counts nothing and stays closed (turns then call the LLM as usual).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from django.core.cache import cache

from . import pipeline

if TYPE_CHECKING:
    from .agent import Agent

logger = logging.getLogger("agentflow.degrade")

CIRCUIT_OPEN_REASON = "LLM circuit breaker open"
OFFLINE_REASON = "offline mode: no LLM is configured, a human has to answer"


def _keys(agent: Agent) -> tuple[str, str, str]:
    base = f"llm-breaker:{agent.name}"
    return f"{base}:failures", f"{base}:open", f"{base}:tripped"


def breaker_is_open(agent: Agent) -> bool:
    """Whether turns of ``agent`` should skip the LLM now."""
    if agent.offline or not agent.config.fallback_config.enabled:
        return False
    try:
        return cache.get(_keys(agent)[1]) is not None
    except Exception as exc:  # Redis down: fail open (call the LLM), never fail the turn
        logger.warning("LLM circuit breaker unavailable: %s", exc)
        return False


def breaker_failure(agent: Agent) -> bool:
    """Count a transient LLM failure; open the breaker at the threshold. True if it is open now."""
    cfg = agent.config.fallback_config
    if not cfg.enabled:
        return False
    failures_key, open_key, tripped_key = _keys(agent)
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
    try:
        cache.delete_many(list(_keys(agent)))
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
