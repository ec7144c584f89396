"""One asyncio event loop per thread, for sync code that awaits the LLM (Celery worker threads, jobs).

Celery 5.7 has no asyncio pool: each worker thread keeps its own loop, so it keeps its own HTTP
connections to the LLM provider across tasks.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

_local = threading.local()
_loops: list[asyncio.AbstractEventLoop] = []
_loops_lock = threading.Lock()


def thread_loop() -> asyncio.AbstractEventLoop:
    """This thread's event loop (created on first use)."""
    loop = getattr(_local, "loop", None)
    if loop is None or loop.is_closed():
        loop = asyncio.new_event_loop()
        _local.loop = loop
        with _loops_lock:
            _loops.append(loop)
    return loop


def take_thread_loops() -> list[asyncio.AbstractEventLoop]:
    """Every loop made so far, forgotten here (the caller closes them: worker shutdown)."""
    with _loops_lock:
        loops, _loops[:] = list(_loops), []
    return loops


def thread_db_executor() -> ThreadPoolExecutor:
    """This thread's own one-thread executor for database work its event loop awaits.

    Django refuses ORM calls on a thread whose event loop is running, so a worker thread that awaits
    the LLM on its loop does its database steps here: one extra thread (and one database connection)
    per worker thread, not a thread per step.
    """
    executor = getattr(_local, "db_executor", None)
    if executor is None:
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentflow-db")
        _local.db_executor = executor
    return executor
