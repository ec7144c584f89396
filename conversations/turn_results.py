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
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import redis
import redis.asyncio
from django.conf import settings
from django.core.cache import DEFAULT_CACHE_ALIAS, caches
from django.db import transaction

from agentflow.conf import REDIS_MAX_CONNECTIONS

logger = logging.getLogger("agentflow.turn_results")
T = TypeVar("T")

# Longer than any wait (MessageIn.wait_seconds ≤ 120 s), so a request that starts waiting late
# still finds the signal; short enough that unread ones do not pile up.
RESULT_TTL = 300
# Bound on each non-blocking Redis call of the wait, and the margin a blocking pop gets over its own
# timeout before the wait gives up on an unanswering server.
COMMAND_SECONDS = 5.0

_lock = threading.Lock()
_client: redis.Redis | None = None
_async_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, redis.asyncio.Redis] = (
    weakref.WeakKeyDictionary()
)


# The default cache's ``make_key`` and the CACHES entry it was made from. ``cache`` is a per-context
# handle: each turn's database step runs in a fresh copy of the caller's context, where asking it
# built a new cache backend (settings, key function, client options) only to make this key.
_make_key: tuple[Any, Callable[[str], str]] | None = None


def result_key(message_id: Any) -> str:
    """The Redis list of one message's "settled" signal (under the cache's key prefix)."""
    global _make_key
    config = settings.CACHES[DEFAULT_CACHE_ALIAS]
    made = _make_key
    if made is None or made[0] is not config:  # first use, or the settings changed (tests)
        made = _make_key = (config, caches[DEFAULT_CACHE_ALIAS].make_key)
    return made[1](f"turn-settled:{message_id}")


def _redis() -> redis.Redis:
    global _client
    with _lock:
        if _client is None:
            _client = redis.Redis.from_url(settings.REDIS_URL, max_connections=REDIS_MAX_CONNECTIONS)
        return _client


def _async_redis() -> redis.asyncio.Redis:
    """A client of the running event loop (an asyncio connection pool belongs to one loop).

    Its sockets have no read timeout: redis-py's default (5 s) would end every blocking wait longer than
    that with a TimeoutError, so a turn slower than 5 s was answered 202 instead of its reply. Each
    call is bounded by ``asyncio.wait_for`` here instead (``_bounded``).
    """
    loop = asyncio.get_running_loop()
    client = _async_clients.get(loop)
    if client is None:
        client = _async_clients[loop] = redis.asyncio.Redis.from_url(
            settings.REDIS_URL,
            socket_timeout=None,
            socket_connect_timeout=COMMAND_SECONDS,
            # One connection per waiting request (each holds a BLMOVE), so not redis-py's 100.
            max_connections=REDIS_MAX_CONNECTIONS,
            socket_keepalive=True,
        )
    return client


async def _bounded(call: Awaitable[T], seconds: float) -> T:
    """``call``, or a ``TimeoutError`` (an ``OSError``) once ``seconds`` have passed without an answer."""
    return await asyncio.wait_for(call, timeout=seconds)


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
    await _bounded(_async_redis().delete(result_key(message_id)), COMMAND_SECONDS)


async def turn_settled_wait(*, message_id: Any, seconds: float) -> str | None:
    """Wait up to ``seconds`` for the turn of ``message_id`` to settle.

    Returns:
        The status it settled with, or None when the time ran out first.

    Raises:
        redis.RedisError: Redis is unreachable (the caller answers 202: poll).
        TimeoutError: Redis did not answer in time (likewise).
    """
    if seconds <= 0:
        return None
    key = result_key(message_id)
    # BLMOVE from the list onto itself: it blocks like BLPOP, but the signal stays in the list (and
    # keeps its expiry) for anyone else waiting on the same message (a resend with the same client
    # id), in one command; BLPOP had to push it back and renew the expiry after.
    moved = await _bounded(
        _async_redis().blmove(key, key, seconds, "LEFT", "RIGHT"),  # type: ignore[arg-type]
        seconds + COMMAND_SECONDS,
    )
    if moved is None:
        return None
    return moved.decode() if isinstance(moved, bytes) else str(moved)
