"""Infrastructure failures: which exceptions mean "a component is down, try again later".

The transports answer these with a clear "unavailable" instead of a crash: REST with a JSON 503 and
``Retry-After`` (``agentflow/web/api.py``, ``agentflow/web/http.py``), the WebSocket chat
with an ``error`` frame and close code 1013 (``conversations/frames.py``). docs/operations.md, "When a
component is down", lists what clients see.
"""

from __future__ import annotations

import django.db.utils
import kombu.exceptions
import psycopg
import redis.exceptions

# A PostgreSQL connection that cannot be made or was lost (Django wraps psycopg's errors, but a pool
# timeout or a raw psycopg call can surface unwrapped: psycopg_pool.PoolTimeout is a psycopg
# OperationalError), Redis down or timing out (cache, rate limits, the channel layer), the Celery
# broker unreachable (kombu wraps the Redis error), or a refused/reset socket.
UNAVAILABLE_ERRORS: tuple[type[Exception], ...] = (
    django.db.utils.OperationalError,
    django.db.utils.InterfaceError,
    psycopg.OperationalError,
    psycopg.InterfaceError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
    ConnectionError,
)

WS_CLOSE_TRY_AGAIN_LATER = 1013  # RFC 6455 / IANA: "Try Again Later"


def is_unavailable(exc: BaseException) -> bool:
    """True when ``exc`` means a component (PostgreSQL, Redis, the channel layer) is down."""
    return isinstance(exc, UNAVAILABLE_ERRORS)


def unavailable_component(exc: BaseException) -> str:
    """Which component failed, as told to clients: ``"database"`` or ``"redis"``."""
    if isinstance(
        exc,
        (
            django.db.utils.OperationalError,
            django.db.utils.InterfaceError,
            psycopg.OperationalError,
            psycopg.InterfaceError,
        ),
    ):
        return "database"
    return "redis"


def unavailable_message(exc: BaseException) -> str:
    """The message clients get: which component is unavailable, never the driver's text."""
    component = unavailable_component(exc)
    name = "the database" if component == "database" else "Redis (cache, channel layer or queue)"
    return f"{name} is unavailable; try again shortly (resending with the same client_message_id is safe)"


def retry_after_seconds() -> int:
    """How long clients are told to wait before trying again (``AGENTFLOW["HEALTH"]``)."""
    from .conf import conf

    return conf().HEALTH.RETRY_AFTER_SECONDS
