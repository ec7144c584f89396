"""Django's ASGI handler with its request threads kept for the next request instead of a new one each.

Django runs each HTTP request in its own ``ThreadSensitiveContext``: the request's synchronous work
(the middleware chain, the API-key check, a view's ``sync_to_async`` steps) runs on one thread of
that request. Without an executor, asgiref starts a new thread for every context and, when the
request ends, a second thread to join the first. Both showed in the web process's profile (about 9 %
of its Python time per REST turn), and a new thread also meant a new database wrapper per request:
the queries that ``agentflow.prepared`` compiles once per connection were compiled again every request.

Here each request gets a one-thread executor from an idle list and gives it back once everything it
submitted has run. A request still has its thread to itself for its whole life, as before; only the
thread outlives it, as a WSGI server's threads do. Django closes the request's database connections
at its start and end (``close_old_connections``), so a reused thread holds no pooled connection
between requests.
"""

from __future__ import annotations

import gc
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from asgiref.sync import ThreadSensitiveContext
from django.core.handlers.asgi import ASGIHandler

IDLE_THREADS_KEPT = 64  # beyond this many idle request threads, a returned one is stopped


class RequestThreads:
    """Idle one-thread executors for requests, handed out and taken back (most recently used first)."""

    def __init__(self, *, keep: int = IDLE_THREADS_KEPT) -> None:
        self.keep = keep
        self._idle: list[ThreadPoolExecutor] = []
        self._lock = threading.Lock()
        self.started = 0  # threads made so far (tests and benches read it)

    def take(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._idle:
                return self._idle.pop()
            self.started += 1
        return ThreadPoolExecutor(max_workers=1, thread_name_prefix="agentflow-request")

    def give_back(self, executor: ThreadPoolExecutor) -> None:
        """Take ``executor`` back once the work already submitted to it has run.

        A request whose client went away may leave a step running on its thread (a cancelled
        ``sync_to_async`` call goes on to its end): a marker queued behind it says when the thread is
        free, so the next request never waits behind another's work.
        """
        executor.submit(_free).add_done_callback(lambda _: self._idle_again(executor))

    def _idle_again(self, executor: ThreadPoolExecutor) -> None:
        with self._lock:
            if len(self._idle) < self.keep:
                self._idle.append(executor)
                return
        executor.shutdown(wait=False)

    def idle(self) -> int:
        with self._lock:
            return len(self._idle)


def _free() -> None:
    return None


class ReusedThreadASGIHandler(ASGIHandler):
    """``ASGIHandler`` whose requests run their synchronous work on reused threads (see the module)."""

    def __init__(self, *, threads: RequestThreads | None = None) -> None:
        super().__init__()
        self.threads = threads or RequestThreads()

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise ValueError(f"Django can only handle ASGI/HTTP connections, not {scope['type']}.")
        executor = self.threads.take()
        try:
            async with ThreadSensitiveContext(executor=executor):
                await self.handle(scope, receive, send)
        finally:
            self.threads.give_back(executor)


def get_asgi_application() -> ReusedThreadASGIHandler:
    """``django.core.asgi.get_asgi_application`` with ``ReusedThreadASGIHandler``."""
    import django

    django.setup(set_prefix=False)
    return ReusedThreadASGIHandler()


def freeze_loaded_heap() -> None:
    """Load the URLconf now, then take everything loaded so far out of the collector's full passes.

    Django, the models, django-ninja's routes and schemas and the channel layer are ~170,000
    long-lived objects that every full collection of the web process walked again: ~100 ms of CPU
    each, about once per 600 REST requests under load (0.2 ms a request; measured in-process with
    ``gc.callbacks``). ``gc.freeze`` moves them to the permanent generation after a last collection
    (no garbage is frozen); they stay alive as before, and what requests make is collected as before.
    The URLconf is otherwise imported by the first request, after the freeze.
    """
    from django.urls import get_resolver

    get_resolver().url_patterns  # noqa: B018 - imports the URLconf (the API's routes)
    gc.collect()
    gc.freeze()
