"""The pool's health check (``agentflow_project.postgres``): a connection in use a moment ago is handed
out with no round trip; one PostgreSQL ended, or one idle for long, gets psycopg_pool's empty query."""

from __future__ import annotations

import select
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from django.db import connection, connections
from psycopg_pool import ConnectionPool

from agentflow_project.postgres import base as postgres

pytestmark = pytest.mark.django_db  # the test database exists; the connections below are psycopg's own


@pytest.fixture
def params() -> dict[str, Any]:
    return {**connection.get_connection_params(), "autocommit": True}


@pytest.fixture
def observer(params: dict[str, Any]) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(**params) as conn:
        yield conn


def _last_query(observer: psycopg.Connection[Any], conn: psycopg.Connection[Any]) -> str:
    """What PostgreSQL last ran for ``conn`` (its backend's ``pg_stat_activity.query``)."""
    row = observer.execute(
        "SELECT query FROM pg_stat_activity WHERE pid = %s", (conn.info.backend_pid,)
    ).fetchone()
    assert row is not None
    return str(row[0])


def _end(observer: psycopg.Connection[Any], conn: psycopg.Connection[Any]) -> None:
    """End ``conn``'s backend as a PostgreSQL restart does, and wait until its socket shows it."""
    observer.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
    poller = select.poll()
    poller.register(conn.pgconn.socket, select.POLLIN)
    assert poller.poll(5000), "PostgreSQL did not end the connection"


def test_a_connection_checked_a_moment_ago_is_handed_out_with_no_round_trip(params, observer) -> None:
    with psycopg.connect(**params) as conn:
        postgres.idle_check(conn)  # its first check: the round trip (an empty query)
        assert _last_query(observer, conn) == ""

        conn.execute("SELECT 42")
        postgres.idle_check(conn)
        postgres.idle_check(conn)

        assert _last_query(observer, conn) == "SELECT 42"  # nothing sent since
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_connection_not_checked_for_a_while_gets_the_round_trip(params, observer, monkeypatch) -> None:
    with psycopg.connect(**params) as conn:
        postgres.idle_check(conn)
        conn.execute("SELECT 42")
        monkeypatch.setattr(postgres, "FULL_CHECK_AFTER", 0.05)
        time.sleep(0.1)

        postgres.idle_check(conn)

        assert _last_query(observer, conn) == ""


def test_a_connection_postgresql_ended_fails_the_check(params, observer) -> None:
    with psycopg.connect(**params) as conn:
        postgres.idle_check(conn)
        _end(observer, conn)

        with pytest.raises(psycopg.OperationalError):
            postgres.idle_check(conn)  # checked a moment ago, but its socket has the server's goodbye


def test_data_waiting_on_a_live_connection_is_read_by_the_full_check(params, observer) -> None:
    with psycopg.connect(**params) as conn:
        conn.execute("LISTEN pool_check_test")
        postgres.idle_check(conn)
        observer.execute("NOTIFY pool_check_test, 'hello'")
        time.sleep(0.2)
        heard: list[str] = []
        conn.add_notify_handler(lambda notify: heard.append(notify.payload))

        postgres.idle_check(conn)  # the socket is readable: the round trip, which reads the notice

        assert heard == ["hello"]
        assert _last_query(observer, conn) == ""


def test_a_pool_hands_out_a_new_connection_for_one_postgresql_ended(params, observer) -> None:
    with ConnectionPool(kwargs=params, min_size=1, max_size=1, check=postgres.idle_check) as pool:
        with pool.connection() as conn:
            conn.execute("SELECT 42")
            first = conn.info.backend_pid
        with pool.connection() as conn:  # in use a moment ago: no round trip
            assert conn.info.backend_pid == first
            assert _last_query(observer, conn) == "SELECT 42"
            _end(observer, conn)
        with pool.connection() as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
            assert conn.info.backend_pid != first


def test_the_settings_engine_builds_its_pool_with_the_socket_check(params, observer) -> None:
    settings_dict = {**connection.settings_dict, "OPTIONS": {**connection.settings_dict["OPTIONS"]}}
    settings_dict["OPTIONS"]["pool"] = {"min_size": 1, "max_size": 1}
    assert settings_dict["CONN_HEALTH_CHECKS"]
    wrapper = type(connections["default"])(settings_dict, alias="pool-check-test")
    assert isinstance(wrapper, postgres.DatabaseWrapper)
    try:
        pool = wrapper.pool
        pool.open(wait=True)
        with pool.connection() as conn:
            conn.execute("SELECT 4242")
        with pool.connection() as conn:
            assert _last_query(observer, conn) == "SELECT 4242"  # Django's own check would send ""
    finally:
        wrapper.close_pool()
