"""A per-message "turn settled" signal in Redis, for the REST request that waits on its turn.

When a turn's outcome is stored (the reply, or the failure), its writer pushes the message's status
onto a Redis list of that message alone, ``LPUSH`` + ``EXPIRE`` (``RESULT_TTL``), once the transaction
commits. The waiting request blocks on it with ``BLMOVE`` (the list onto itself, so the signal stays)
and a timeout, then reads the stored result from the database. Compared with subscribing to the user's whole channel group, the wait needs no
channel-layer capacity, sees no other turn's traffic, holds no database connection, and cannot miss
a turn that settled before it started waiting (the list is still there); a signal nobody waited
for expires.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import weakref
from typing import Any

import redis
import redis.asyncio
from django.conf import settings
from django.core.cache import cache
from django.db import transaction

logger = logging.getLogger("agentflow.turn_results")

# Longer than any wait (MessageIn.wait_seconds ≤ 120 s), so a request that starts waiting late
# still finds the signal; short enough that unread ones do not pile up.
RESULT_TTL = 300

_lock = threading.Lock()
_client: redis.Redis | None = None
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis] = (
    weakref.WeakKeyDictionary()
)


def result_key(message_id: Any) -> str:
    """The Redis list of one message's "settled" signal (under the cache's key prefix)."""
    return cache.make_key(f"turn-settled:{message_id}")


def _redis() -> redis.Redis:
    global _client
    with _lock:
        if _client is None:
            _client = redis.Redis.from_url(settings.REDIS_URL)
        return _client


def _async_redis() -> redis.asyncio.Redis:
    """A client of the running event loop (an asyncio connection pool belongs to one loop)."""
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        client = _async_clients[loop] = redis.asyncio.Redis.from_url(settings.REDIS_URL)
    return client


def turn_settled(*, message_id: Any, status: str) -> None:
    """Signal that the turn of ``message_id`` reached ``status`` (done or failed). Never raises: a
    lost signal only makes a waiting request wait out its time and read the result then."""
    key = result_key(message_id)
    try:
        pipe = _redis().pipeline(transaction=False)
        pipe.lpush(key, status)
        pipe.expire(key, RESULT_TTL)
        pipe.execute()
    except redis.RedisError as exc:
        logger.warning("could not signal the end of the turn of message %s: %s", message_id, exc)


def turn_settled_on_commit(*, message_id: Any, status: str) -> None:
    """``turn_settled`` once the surrounding transaction commits (the result is readable by then)."""
    transaction.on_commit(lambda: turn_settled(message_id=message_id, status=status))


async def turn_settled_clear(*, message_id: Any) -> None:
    """Forget an earlier settling of ``message_id`` (its failed turn runs again: a resend)."""
    await _async_redis().delete(result_key(message_id))


async def turn_settled_wait(*, message_id: Any, seconds: float) -> str | None:
    """Wait up to ``seconds`` for the turn of ``message_id`` to settle.

    Returns:
        The status it settled with, or None when the time ran out first.

    Raises:
        redis.RedisError: Redis is unreachable (the caller answers 202: poll).
    """
    if seconds <= 0:
        return None
    key = result_key(message_id)
    # BLMOVE from the list onto itself: it blocks like BLPOP, but the signal stays in the list (and
    # keeps its expiry) for anyone else waiting on the same message (a resend with the same client
    # id), in one command; BLPOP had to push it back and renew the expiry after.
    moved = await _async_redis().blmove(key, key, seconds, "LEFT", "RIGHT")  # type: ignore[arg-type]
    if moved is None:
        return None
    return moved.decode() if isinstance(moved, bytes) else str(moved)
