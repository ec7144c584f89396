"""Follow-up jobs (memory writing, summaries): the one way any code queues one.

``queue_on_commit("memory.remember_resolution", thread_id)`` runs the named Celery task once the
surrounding transaction commits: on a Celery worker, or, while a turn of an agent built by a
script runs (``inline_jobs``), on a small thread pool in this process, with that very agent. By
name, so the code that queues does not import the transports (tasks) that run it.
``AGENTFLOW["BACKGROUND_JOBS"] = False`` turns jobs off (the test suite does, except where a test
exercises them: a job left running would race other tests' database resets).
"""

from __future__ import annotations

import contextvars
import logging
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from . import hoptrace
from .conf import conf

logger = logging.getLogger("agentflow.jobs")

_inline: contextvars.ContextVar[bool] = contextvars.ContextVar("agentflow_inline_jobs", default=False)
_pool_lock = threading.Lock()
_pool: ThreadPoolExecutor | None = None
_pending: set[Future[Any]] = set()
# What the turn that queued a job had already computed, handed to the job when it runs in this
# process (``handed_over``); None on a Celery worker, where the job computes it again.
_handoff: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "agentflow_job_handoff", default=None
)


@contextmanager
def inline_jobs(enabled: bool = True) -> Iterator[None]:
    """Run the jobs queued inside this block in this process (a script's agent has no worker)."""
    token = _inline.set(enabled)
    try:
        yield
    finally:
        _inline.reset(token)


_import_lock = threading.Lock()


def _import_task_modules(task_name: str) -> None:
    """Import the task modules, once per process: a plain script never did (a worker does, at start).

    The installed apps' ``tasks`` modules, as a worker's autodiscovery finds them; the loader's
    ``import_default_modules`` only when that did not register ``task_name`` (a host's Celery
    ``imports``). That one sends Celery's ``import_modules`` signal, on which its Django fix-up runs
    ``django.setup()``, the logging configuration and every system check again: ~0.15 s of CPU, and
    twice when both job threads arrived at once (measured in-process, 50-turn conversation).
    """
    from celery import current_app

    with _import_lock:
        if task_name in current_app.tasks:
            return
        current_app.autodiscover_tasks(force=True)
        if task_name not in current_app.tasks:
            current_app.loader.import_default_modules()


def handed_over(key: str) -> Any:
    """What the queueing turn handed this job under ``key`` (``queue_on_commit(handoff=...)``), or
    None: always None on a Celery worker, so a job uses it only to skip work it can also do itself."""
    handoff = _handoff.get()
    return None if handoff is None else handoff.get(key)


def _run_inline(task_name: str, args: list[Any], handoff: Mapping[str, Any] | None = None) -> None:
    from celery import current_app
    from django.db import connections

    token = _handoff.set(handoff)
    try:
        if task_name not in current_app.tasks:
            _import_task_modules(task_name)
        current_app.tasks[task_name].apply(args=args, throw=False)
    except Exception:  # a job's failure never reaches the turn that queued it
        logger.exception("inline job %s%r failed", task_name, tuple(args))
    finally:
        _handoff.reset(token)
        connections.close_all()


def _submit_inline(task_name: str, args: list[Any], handoff: Mapping[str, Any] | None = None) -> None:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="agentflow-job")
        future = _pool.submit(_run_inline, task_name, args, handoff)
        _pending.add(future)
    future.add_done_callback(_pending.discard)


def queue_on_commit(task_name: str, *args: Any, handoff: Mapping[str, Any] | None = None) -> None:
    """Queue the job ``task_name(*args)`` once the current transaction commits (now, outside one).

    ``handoff``: what the caller already computed that the job would compute again (e.g. the
    message's vector), given to the job if it runs in this process (``handed_over``); never sent
    to a worker (the task's arguments stay ids).
    """
    from django.db import transaction

    if not conf().BACKGROUND_JOBS:
        return
    if _inline.get():
        transaction.on_commit(lambda: _submit_inline(task_name, list(args), handoff))
        return

    def send() -> None:
        from celery import current_app

        current_app.send_task(task_name, args=list(args))

    transaction.on_commit(send)


def wait_for_inline_jobs(timeout: float | None = None) -> None:
    """Wait until the jobs queued in this process have run (tests; a script that exits waits anyway)."""
    from concurrent.futures import wait

    with _pool_lock:
        pending = list(_pending)
    wait(pending, timeout=timeout)


TURN_TASK = "agentflow.process_turn"


def queue_turn(
    message_id: Any, *, agent: str | None = None, version: int | None = None, user_pk: int | None = None
) -> None:
    """Queue the turn of a stored user message on a Celery worker once the transaction commits.

    Always a worker (never inline, never off): REST and WebSocket transports hand every turn over.
    ``agent`` (its name), ``version`` (the stored version the message was accepted under) and
    ``user_pk`` (the message's end user), when the caller knows them all, travel with the task: a
    worker that runs that agent at that version starts the turn without reading them again
    (``conversations.tasks.process_turn``, which still checks them against the message it reads).
    """
    from django.db import transaction

    kwargs: dict[str, Any] = {}
    if agent is not None and version is not None and user_pk is not None:
        kwargs = {"agent": agent, "version": version, "user_pk": user_pk}

    def send() -> None:
        from celery import current_app

        hoptrace.mark(message_id, "w_stored")
        current_app.send_task(TURN_TASK, args=[str(message_id)], kwargs=kwargs)
        hoptrace.mark(message_id, "w_queued")

    transaction.on_commit(send)
