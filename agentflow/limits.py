"""How long a turn may take, and the recovery windows derived from it (one place for the numbers).

A turn's longest LLM call is ``LLMConfig.timeout_seconds`` x (``max_retries`` + 1) with the defaults
(60 s x 3 = 180 s); the turn gets a minute more for the database steps, tools and the thread and
intent judgements. Every other window follows from that, so they stay consistent:

- ``TURN_SOFT_LIMIT`` (240 s): the worker cancels a turn still running (the message is ``failed``,
  the client told). Celery's own limits (enforced by prefork pools only) come after it, so the clean
  cancel happens first: ``CELERY_SOFT_LIMIT`` (255 s) and ``TURN_HARD_LIMIT`` (270 s, ``time_limit``).
- ``STALE_CLAIM`` (300 s): a ``processing`` claim older than this belongs to a dead worker and can be
  taken over. Longer than the hard limit, so a live turn is never taken over.
- ``VISIBILITY_TIMEOUT`` (360 s): Redis redelivers an unacknowledged turn task after this (a worker
  killed mid-turn). Longer than the stale-claim window, so a redelivered task normally finds the claim
  stale and takes it over; one that still finds it live retries when it goes stale.
- ``PENDING_GRACE`` (60 s): a ``pending`` message older than this was never queued or was lost.
- The recovery sweep (``conversations.recover_unanswered``) runs every ``SWEEP_EVERY`` (30 s),
  re-queues a stuck message at most every ``REQUEUE_SPACING`` (120 s), and marks it ``failed`` once it
  has been re-queued ``MAX_REQUEUES`` (3) times and is still unanswered.

An agent configured with a longer LLM timeout or more SDK retries than the defaults needs a longer
turn: set ``AGENTFLOW_TURN_TIME_LIMIT`` (seconds, 10-3600; read once at start, the same in every web
and worker process) and every window above follows (see docs/operations.md, "Failure and recovery").
Below a minute (a test or chaos stack with a fast LLM) the margins and the recovery windows shrink in
proportion (x limit/60), so that stale claims and lost tasks are recovered in seconds; at 12 s:
15 / 18 / 24 / 36 s, pending grace 12 s, sweep every 6 s, re-queue spacing 24 s.
"""

from __future__ import annotations

import math
import os
from datetime import timedelta

from .config import LLMConfig
from .errors import ConfigError

TURN_LIMIT_VARIABLE = "AGENTFLOW_TURN_TIME_LIMIT"


def _turn_limit(default: timedelta) -> timedelta:
    """``AGENTFLOW_TURN_TIME_LIMIT`` (whole seconds, 10-3600), or ``default``."""
    raw = os.environ.get(TURN_LIMIT_VARIABLE, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 10 <= int(raw) <= 3600:
        raise ConfigError(f"{TURN_LIMIT_VARIABLE} must be whole seconds from 10 to 3600 (got {raw!r})")
    return timedelta(seconds=int(raw))


_LLM = LLMConfig()
LONGEST_LLM_CALL = timedelta(seconds=_LLM.timeout_seconds * (_LLM.max_retries + 1))
TURN_SOFT_LIMIT = _turn_limit(LONGEST_LLM_CALL + timedelta(seconds=60))
_SCALE = min(1.0, TURN_SOFT_LIMIT.total_seconds() / 60)


def _window(seconds: int) -> timedelta:
    """``seconds``, shrunk in proportion for a turn limit below a minute."""
    return timedelta(seconds=math.ceil(seconds * _SCALE))


CELERY_SOFT_LIMIT = TURN_SOFT_LIMIT + _window(15)
TURN_HARD_LIMIT = TURN_SOFT_LIMIT + _window(30)
STALE_CLAIM = TURN_HARD_LIMIT + _window(30)
VISIBILITY_TIMEOUT = STALE_CLAIM + _window(60)

PENDING_GRACE = _window(60)
SWEEP_EVERY = _window(30)
REQUEUE_SPACING = _window(120)
MAX_REQUEUES = 3
