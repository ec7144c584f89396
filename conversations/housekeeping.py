"""Housekeeping the beat does, so that no turn pays for it: expired sessions, dormant threads.

A turn used to mark the user's expired sessions and idle threads on every message (a scan and an
update each time, almost always finding nothing). Now a message marks only what it meets (the
session it replaces, the candidate threads it has read anyway; see ``services.session_for_turn`` and
``services.threads_mark_dormant``), and this task, run by Celery beat every ``HOUSEKEEPING_EVERY``,
marks the rest: sessions of users who never came back, threads nobody wrote in.
"""

from __future__ import annotations

import logging
import os
from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from .models import Agent
from .services import sessions_mark_expired, threads_mark_dormant_all

logger = logging.getLogger("agentflow.housekeeping")

HOUSEKEEPING_TASK = "conversations.housekeeping"
HOUSEKEEPING_EVERY = timedelta(minutes=1)
DEFAULT_INACTIVITY_MINUTES = 30  # SessionConfig.thread_inactivity_threshold's default


def inactivity_by_agent() -> dict[int, timedelta]:
    """Each agent's thread inactivity threshold, from its stored configuration (AGENT_* overrides win)."""
    from agentflow.config import AgentFrameworkConfig, deep_merge, env_overrides

    env_data, _ = env_overrides(os.environ)
    thresholds: dict[int, timedelta] = {}
    for agent in Agent.objects.only("pk", "name", "config"):
        try:
            config = AgentFrameworkConfig.model_validate(
                deep_merge({**agent.config, "name": agent.name}, env_data)
            )
            minutes = config.session_config.thread_inactivity_threshold
        except ValueError:  # a stored configuration this version cannot read: the default
            logger.warning("agent %s: unreadable configuration; default inactivity threshold", agent.name)
            minutes = DEFAULT_INACTIVITY_MINUTES
        thresholds[agent.pk] = timedelta(minutes=minutes)
    return thresholds


def housekeeping_run() -> dict[str, int]:
    """Mark expired sessions (queueing their memory) and idle open threads dormant, for every user."""
    now = timezone.now()
    return {
        "sessions_expired": sessions_mark_expired(now=now),
        "threads_dormant": threads_mark_dormant_all(idle_by_agent=inactivity_by_agent(), now=now),
    }


@shared_task(name=HOUSEKEEPING_TASK)
def housekeeping() -> dict[str, int]:
    """Beat task (every ``HOUSEKEEPING_EVERY``): see ``housekeeping_run``."""
    return housekeeping_run()
