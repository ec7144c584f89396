"""One asyncio event loop per thread, for sync code that awaits the LLM (Celery worker threads, jobs).

Celery 5.7 has no asyncio pool: each worker thread keeps its own loop, so it keeps its own HTTP
connections to the LLM provider across tasks.
"""

from __future__ import annotations

import asyncio
import threading

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
