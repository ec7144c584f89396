"""Django's PostgreSQL backend, with a cheaper health check of a pooled connection.

With ``CONN_HEALTH_CHECKS`` and a pool, Django hands psycopg_pool its ``check_connection``: an empty
query, one round trip to PostgreSQL, each time a connection is checked out. A turn checks out two
(the web process one or two more), each a few milliseconds after the connection came back, so under
load almost every check tests a connection that just worked. ``idle_check`` asks the socket instead:
a connection PostgreSQL ended (a restart, ``pg_terminate_backend``, an idle timeout, a pooler gone)
has its error message and end of stream waiting on it, so a socket with nothing to read and a
connection used within ``FULL_CHECK_AFTER`` seconds are handed out as they are. Anything else (data
waiting, a connection idle longer, one not cleanly idle) gets psycopg_pool's own check, which raises
when the connection is dead (the pool then drops it and hands out another).
"""

from __future__ import annotations

import select
import time
from typing import Any

from django.db.backends.postgresql import base
from psycopg import pq
from psycopg_pool import ConnectionPool

# A connection not checked out for this long gets the round trip: a silent network (a NAT or
# firewall that forgot the connection) shows nothing on the socket until something is sent.
FULL_CHECK_AFTER = 5.0

_LAST_CHECK = "_agentflow_checked_at"  # monotonic time of the connection's last check, on the connection


def idle_check(conn: Any) -> None:
    """psycopg_pool's ``check``: raise if ``conn`` is unusable, with no round trip when it is clearly fine.

    Raises:
        psycopg.OperationalError: the connection is closed or broken (from ``check_connection``).
    """
    now = time.monotonic()
    last = getattr(conn, _LAST_CHECK, None)
    setattr(conn, _LAST_CHECK, now)
    pgconn = conn.pgconn
    if (
        last is not None
        and now - last < FULL_CHECK_AFTER
        and pgconn.status == pq.ConnStatus.OK
        and pgconn.transaction_status == pq.TransactionStatus.IDLE
        and not _readable(pgconn.socket)
    ):
        return
    ConnectionPool.check_connection(conn)


def _readable(fd: int) -> bool:
    """Whether the socket has anything to read or is hung up (no wait). An idle connection's has
    nothing: every reply was read to its end."""
    poller = select.poll()  # not select(): a busy web process's descriptors pass 1,024
    poller.register(fd, select.POLLIN | select.POLLPRI)
    return bool(poller.poll(0))


class DatabaseWrapper(base.DatabaseWrapper):
    @property
    def pool(self) -> Any:
        """Django's pool, built with ``idle_check`` as its check when ``CONN_HEALTH_CHECKS`` is on.

        Django 5.2 keeps the pools in ``_connection_pools`` (one per alias, shared by the threads) and
        builds one there on first use; one put there first is the one it uses.
        """
        options = self.settings_dict["OPTIONS"].get("pool")
        pools = self._connection_pools  # type: ignore[attr-defined]  # not in django-stubs
        if options and self.settings_dict["CONN_HEALTH_CHECKS"] and self.alias not in pools:
            pools.setdefault(self.alias, self._checked_pool({} if options is True else options))
        return super().pool

    def _checked_pool(self, options: dict[str, Any]) -> ConnectionPool:
        # As Django builds it (not opened yet, connections in autocommit, Django's per-connection
        # set-up), with the socket check in place of the empty query.
        kwargs = self.get_connection_params()
        kwargs["autocommit"] = True
        return ConnectionPool(
            kwargs=kwargs,
            open=False,
            configure=self._configure_connection,  # type: ignore[attr-defined]  # not in django-stubs
            check=idle_check,
            **options,
        )
