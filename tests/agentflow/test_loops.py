"""agentflow.loops: database steps of coroutines on a shared event loop run side by side (run_db); a
Celery worker thread's turn runs its steps on that thread (ThreadSteps)."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from asgiref.sync import async_to_sync

from agentflow.loops import SHARED_DB_THREADS, run_db


async def test_steps_of_concurrent_coroutines_run_on_several_threads_at_once() -> None:
    # Each step waits until all four are inside: on one thread (database_sync_to_async's
    # thread-sensitive default) the first would wait alone and the barrier would break.
    barrier = threading.Barrier(4, timeout=30)

    arrivals = await asyncio.gather(*(run_db(barrier.wait) for _ in range(4)))

    assert sorted(arrivals) == [0, 1, 2, 3]
    assert SHARED_DB_THREADS >= 4


def test_a_synchronous_caller_keeps_its_own_thread() -> None:
    # async_to_sync from this thread: the step runs here, in this thread's connection and transaction.
    caller = threading.get_ident()

    async def step() -> int:
        return await run_db(threading.get_ident)

    assert async_to_sync(step)() == caller


async def test_an_exception_in_the_step_reaches_the_caller() -> None:
    def broken() -> None:
        raise ValueError("no such row")

    with pytest.raises(ValueError, match="no such row"):
        await run_db(broken)


@pytest.mark.django_db(transaction=True)
def test_a_worker_threads_database_thread_holds_no_connection_between_steps() -> None:
    # A Celery worker thread awaits the LLM between its database steps: its database thread gives the
    # connection back to the pool after each step, so threads in flight do not each hold one.
    from django.db import connection

    from agentflow.loops import thread_db_executor

    assert connection.settings_dict["OPTIONS"].get("pool"), "the tests run with a pool"
    db = thread_db_executor()

    def query() -> int:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return int(cursor.fetchone()[0])

    assert db.submit(query).result() > 0
    assert db.submit(lambda: connection.connection).result() is None
    # The same thread each time (one database thread per worker thread).
    assert db.submit(threading.get_ident).result() == db.submit(threading.get_ident).result()


@pytest.mark.django_db(transaction=True)
def test_a_step_inside_a_transaction_keeps_its_connection() -> None:
    from django.db import connection, transaction

    from agentflow.loops import release_connections

    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        release_connections()
        assert connection.connection is not None  # the transaction goes on
        with connection.cursor() as cursor:
            cursor.execute("SELECT 2")
            assert cursor.fetchone() == (2,)


def test_an_exception_in_a_worker_step_reaches_the_caller() -> None:
    from agentflow.loops import thread_db_executor

    def broken() -> None:
        raise ValueError("no such message")

    with pytest.raises(ValueError, match="no such message"):
        thread_db_executor().submit(broken).result()


@pytest.mark.django_db(transaction=True)
def test_a_worker_threads_steps_run_on_that_thread_with_its_loop_paused() -> None:
    # A Celery worker thread's turn: the coroutine's database steps run on the thread that drives its
    # loop (no hop to another thread), in the coroutine's context, and give the connection back after
    # each step so the thread holds none while the turn awaits the LLM.
    import contextvars

    from django.db import connection

    from agentflow.loops import ThreadSteps

    label: contextvars.ContextVar[str] = contextvars.ContextVar("label", default="")
    steps = ThreadSteps()
    loop = asyncio.new_event_loop()
    driver = threading.get_ident()

    def step(n: int) -> tuple[int, int, str]:
        with connection.cursor() as cursor:
            cursor.execute("SELECT %s::int + 1", [n])
            value = int(cursor.fetchone()[0])
        return value, threading.get_ident(), label.get()

    async def turn() -> list[Any]:
        label.set("turn 1")
        first = await steps.run(step, 1)
        held_between = connection.connection is not None
        await asyncio.sleep(0.01)  # the loop runs between steps (the LLM's wait)
        second = await steps.run(step, first[0])
        return [first, second, held_between]

    try:
        first, second, held_between = steps.drive(loop, turn())
    finally:
        loop.close()
    assert first == (2, driver, "turn 1")
    assert second == (3, driver, "turn 1")
    assert held_between is False
    assert connection.connection is None


@pytest.mark.django_db(transaction=True)
def test_a_worker_threads_last_step_keeps_its_connection_for_the_next_read() -> None:
    # A turn's last step (finish) keeps the thread's connection for the task's own read right after
    # the turn (the thread change it announces): one pool checkout, not two; the steps before it
    # still give theirs back.
    from django.db import connection

    from agentflow.loops import ThreadSteps

    steps = ThreadSteps()
    loop = asyncio.new_event_loop()

    def backend_pid() -> tuple[bool, int]:
        """(whether the thread held a connection before this step, the connection's backend)"""
        held = connection.connection is not None
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            return held, int(cursor.fetchone()[0])

    async def turn() -> tuple[tuple[bool, int], tuple[bool, int]]:
        await steps.run(backend_pid)
        second = await steps.run(backend_pid)
        last = await steps.run_last(backend_pid)
        await asyncio.sleep(0.01)  # what follows the last step (the last delta's send)
        return second, last

    assert connection.settings_dict["OPTIONS"].get("pool"), "the tests run with a pool"
    try:
        (second_held, _), (last_held, last_pid) = steps.drive(loop, turn())
        assert (second_held, last_held) == (False, False)  # the steps before gave theirs back
        assert steps.submit(backend_pid).result() == (True, last_pid)  # the last one's is kept
    finally:
        loop.close()
        connection.close()


def test_a_worker_threads_step_error_reaches_the_coroutine_and_the_loop_goes_on() -> None:
    from agentflow.loops import ThreadSteps

    steps = ThreadSteps()
    loop = asyncio.new_event_loop()

    def broken() -> None:
        raise ValueError("no such message")

    async def turn() -> str:
        try:
            await steps.run(broken)
        except ValueError as exc:
            caught = str(exc)
        return caught + " / " + await steps.run(lambda: "next step")

    try:
        assert steps.drive(loop, turn()) == "no such message / next step"
        # Outside a running loop a step runs at once (the task's own reads around the turn).
        assert steps.submit(lambda: threading.get_ident()).result() == threading.get_ident()
        with pytest.raises(ValueError, match="no such message"):
            steps.submit(broken).result()
    finally:
        loop.close()


def test_a_worker_threads_step_refuses_another_loop() -> None:
    from agentflow.loops import ThreadSteps

    steps = ThreadSteps()

    async def stray() -> None:
        await steps.run(lambda: None)

    with pytest.raises(RuntimeError, match="outside the coroutine"):
        asyncio.run(stray())

    async def submit_on_loop() -> None:
        steps.submit(lambda: None)

    with pytest.raises(RuntimeError, match="await run"):
        asyncio.run(submit_on_loop())
