"""Components made unavailable on purpose, for one request: a refused database pool, a dead Redis port."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg_pool
from django.db import connections

POOL_TIMEOUT = "couldn't get a connection after 20.00 sec"


def unused_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def dead_redis_url() -> str:
    return f"redis://127.0.0.1:{unused_port()}/0"


@contextmanager
def refused_pool() -> Iterator[None]:
    """The database pool refuses every new connection, as when PostgreSQL is down or the pool is drained.

    Connections already checked out keep working: close them first (``connection.close()``) for the
    next query to ask the pool.
    """
    pool = connections["default"].pool
    assert pool is not None, "the test database must use the psycopg pool"
    original = pool.getconn

    def refuse(timeout: float | None = None) -> Any:
        raise psycopg_pool.PoolTimeout(POOL_TIMEOUT)

    pool.getconn = refuse  # type: ignore[method-assign]
    try:
        yield
    finally:
        pool.getconn = original  # type: ignore[method-assign]
