"""agentflow.loops.run_db: database steps of coroutines on a shared event loop run side by side."""

from __future__ import annotations

import asyncio
import threading

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
