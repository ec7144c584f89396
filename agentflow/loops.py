"""One asyncio event loop per thread, for sync code that awaits the LLM (Celery worker threads, jobs).

Celery 5.7 has no asyncio pool: each worker thread keeps its own loop, so it keeps its own HTTP
connections to the LLM provider across tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import os
import threading
from collections.abc import Callable, Coroutine
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

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


def run_off_database(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` (an LLM call) to completion on this thread's loop, holding no pooled database
    connection while it waits: a synchronous job (a memory summary) gives its connection back first,
    so a slow LLM does not starve the worker's turns of connections. Not inside a transaction: there
    the connection stays, as ``release_connections`` keeps it."""
    release_connections(pooled_only=True)
    return thread_loop().run_until_complete(coro)


def take_thread_loops() -> list[asyncio.AbstractEventLoop]:
    """Every loop made so far, forgotten here (the caller closes them: worker shutdown)."""
    with _loops_lock:
        loops, _loops[:] = list(_loops), []
    return loops


class _ReleasingExecutor(Executor):
    """A one-thread executor whose thread gives its database connections back to the pool after
    every call (outside a transaction), so it holds none while its caller awaits the LLM."""

    def __init__(self) -> None:
        self._inner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentflow-db")

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        return self._inner.submit(_call_and_release, functools.partial(fn, *args, **kwargs), pooled_only=True)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._inner.shutdown(wait=wait, cancel_futures=cancel_futures)


def release_connections(*, pooled_only: bool = False) -> None:
    """Give this thread's database connections back to the pool (close them), except one inside a
    transaction; with ``pooled_only``, keep a connection that has no pool (reopening it would cost a
    new PostgreSQL session per call)."""
    from django.db import connections

    for connection in connections.all(initialized_only=True):
        if connection.in_atomic_block:
            continue
        if pooled_only and not connection.settings_dict["OPTIONS"].get("pool"):
            continue
        # A connection that fails to close is dropped all the same (Django forgets it, the pool's
        # check discards it); the step's own result or error is what the caller gets.
        with contextlib.suppress(Exception):
            connection.close()


def _call_and_release(call: Callable[[], T], *, pooled_only: bool = False) -> T:
    try:
        return call()
    finally:
        release_connections(pooled_only=pooled_only)


def releasing(fn: Callable[..., T]) -> Callable[..., T]:
    """``fn`` that gives its thread's pooled database connections back to the pool when it returns
    (outside a transaction): for steps run on ``shared_db_executor``, whose idle threads must hold
    none (``run_db``'s callers, a WebSocket consumer, rely on their next query asking the pool)."""

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> T:
        return _call_and_release(functools.partial(fn, *args, **kwargs), pooled_only=True)

    return call


def thread_db_executor() -> Executor:
    """This thread's own one-thread executor for database work its event loop awaits.

    Django refuses ORM calls on a thread whose event loop is running, so a thread that awaits the LLM
    on its loop can do its database steps here: one extra thread per thread, not a thread per step
    (the Celery worker's turns use ``ThreadSteps`` instead, with no extra thread). The thread gives its connection back to the pool after each step, so a worker
    thread holds no database connection while its turn awaits the LLM: the worker's threads (turns
    in flight) and its database pool (database steps at once) are sized apart.
    """
    executor = getattr(_local, "db_executor", None)
    if executor is None:
        executor = _ReleasingExecutor()
        _local.db_executor = executor
    return executor


class ThreadSteps(Executor):
    """This thread's database steps, run on this thread itself, for a turn driven by ``drive``.

    A Celery worker thread runs its turn's coroutine on its own event loop (``thread_loop``), which
    serves that one turn. A step submitted while no loop runs on the thread (the task's own reads and
    writes around the turn) runs at once. A step a coroutine awaits (``run``) pauses the loop:
    ``drive`` stops it, runs the step here (Django refuses ORM calls only while a loop runs on the
    thread) and starts it again with the step's result. Nothing else runs on that loop meanwhile,
    as nothing did while it awaited a database thread. Each step gives its connections back to the
    pool afterwards (outside a transaction), as ``thread_db_executor``'s thread does, so the thread
    holds none while its turn awaits the LLM.

    A step submitted outside the loop (``submit``) keeps its connection for the thread's next step:
    the task's own read before the turn and the turn's first step share one pool checkout.

    Handing each step to a database thread and back cost every step thread switches and wake-ups of
    the loop (a futex, the loop's self-pipe, a poll), under a contended GIL, and the worker 64
    threads more (docs/operations.md, "Worker process CPU").
    """

    def __init__(self) -> None:
        self._due: list[tuple[Callable[[], Any], Any, bool]] = []  # (the step, its future, keep)
        self._loop: asyncio.AbstractEventLoop | None = None

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        """Run ``fn`` now, on this thread; for a step of a coroutine on a running loop use ``run``.

        The connection stays checked out for the thread's next step (the turn's first step, read right
        after the task's own ``_agent_of``): one pool checkout and health check fewer. The caller gives
        it back (``release_connections``, or the next step awaited through ``run``, which does).
        """
        if _running_loop() is not None:
            raise RuntimeError("ThreadSteps.submit with an event loop running on this thread: await run()")
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # the caller's .result() raises it, as with a thread's future
            future.set_exception(exc)
        return future

    async def run(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)`` for the coroutine ``drive`` runs: on this thread, the loop paused,
        in the coroutine's context (its log fields, ``inline_jobs``)."""
        return await self._run(fn, args, kwargs, keep=False)

    async def run_last(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
        """``run`` for the coroutine's last database step (a turn's ``finish``): the connection stays
        checked out for the thread's next step, as after ``submit``, instead of going back to the pool
        and being checked out (and health-checked: a round trip) again by the task's own read right
        after the turn. Nothing long is awaited in between (the last delta, a Redis send)."""
        return await self._run(fn, args, kwargs, keep=True)

    async def _run(self, fn: Callable[..., T], args: Any, kwargs: Any, *, keep: bool) -> T:
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            raise RuntimeError("ThreadSteps.run outside the coroutine its drive() runs")
        future: asyncio.Future[T] = loop.create_future()
        context = contextvars.copy_context()
        self._due.append((functools.partial(context.run, fn, *args, **kwargs), future, keep))
        loop.stop()  # the loop finishes its current round of callbacks, then drive() runs the step
        return await future

    def drive(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, T]) -> T:
        """``loop.run_until_complete(coro)``, running the steps ``coro`` awaits (``run``) in between."""
        if self._loop is not None:
            raise RuntimeError("ThreadSteps.drive is already running a coroutine")
        task = loop.create_task(coro)
        stop = lambda _: loop.stop()  # noqa: E731
        task.add_done_callback(stop)
        self._loop = loop
        try:
            while True:
                loop.run_forever()
                while self._due:
                    call, future, keep = self._due.pop(0)
                    if future.cancelled():
                        continue
                    try:
                        result = call() if keep else _call_and_release(call, pooled_only=True)
                    except BaseException as exc:
                        future.set_exception(exc)
                    else:
                        future.set_result(result)
                if task.done():
                    return task.result()
        finally:
            self._loop = None
            self._due.clear()
            task.remove_done_callback(stop)


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def thread_steps() -> ThreadSteps:
    """This thread's ``ThreadSteps`` (a Celery worker thread's turns)."""
    steps = getattr(_local, "steps", None)
    if steps is None:
        steps = _local.steps = ThreadSteps()
    return steps


_shared: ThreadPoolExecutor | None = None
SHARED_DB_THREADS = 8


def shared_db_executor() -> ThreadPoolExecutor:
    """The process's pool of threads for the database steps of turns run on a shared event loop
    (``Agent.process_message``). ``sync_to_async``'s default (thread-sensitive) would run every
    concurrent turn's steps, the embedding included, on one thread, one after another.

    Every call gives its pooled connection back after it (``run_db``, ``releasing``), so an idle
    thread holds none; steps in flight each hold one: size the pool (``AGENTFLOW_DB_POOL_MAX``) above
    ``AGENTFLOW_INPROCESS_DB_THREADS`` (default 8) plus the process's other users of the database.
    """
    global _shared
    with _loops_lock:
        if _shared is None:
            raw = os.environ.get("AGENTFLOW_INPROCESS_DB_THREADS", "").strip()
            if raw and not (raw.isdigit() and int(raw) >= 1):
                raise ValueError(
                    f"AGENTFLOW_INPROCESS_DB_THREADS must be a whole number of at least 1; got {raw!r}"
                )
            _shared = ThreadPoolExecutor(
                max_workers=int(raw) if raw else SHARED_DB_THREADS, thread_name_prefix="agentflow-turn-db"
            )
        return _shared


def sync_caller_waits() -> bool:
    """Whether the running coroutine belongs to a synchronous caller's thread or a request's context:
    ``async_to_sync`` from a sync thread (a test, a sync view in a transaction) or a Django request's
    ``ThreadSensitiveContext``. Its database steps then stay on that thread (``sync_to_async``'s
    thread-sensitive mode), in the caller's connection and transaction; only turns on a plain event
    loop of their own (``asyncio.run``, a script) use ``shared_db_executor``.
    """
    from asgiref.sync import AsyncToSync, SyncToAsync

    if getattr(AsyncToSync.executors, "current", None) is not None:
        return True
    if SyncToAsync.thread_sensitive_context.get(None) is not None:
        return True
    return asyncio.get_running_loop() in AsyncToSync.loop_thread_executors


async def run_db(func: Callable[..., T], /, *args: Any, **kwargs: Any) -> T:
    """``func(*args, **kwargs)`` for a coroutine on a shared event loop (a WebSocket consumer), on the
    process's pool of database threads (``shared_db_executor``); the thread gives its database
    connections back to the pool after the call, so an idle thread holds none.

    channels' ``database_sync_to_async`` is thread-sensitive: every consumer of a web process ran its
    database steps on one thread, one after another. At 500 WebSocket users connecting on a busy
    machine, handshakes then waited past daphne's handshake timeout and were reset (460 of 500 users
    could not connect; bench/production_load.py). A synchronous caller's coroutine (a test through
    ``async_to_sync``, a request's context) keeps its own thread, as ``sync_caller_waits`` tells.
    """
    from asgiref.sync import sync_to_async
    from channels.db import DatabaseSyncToAsync

    if sync_caller_waits():
        return await DatabaseSyncToAsync(func)(*args, **kwargs)

    return await sync_to_async(
        functools.partial(_call_and_release, functools.partial(func, *args, **kwargs)),
        thread_sensitive=False,
        executor=shared_db_executor(),
    )()
