"""Draining a web process on SIGTERM: answer what is waiting, close the sockets cleanly, then stop.

daphne (Twisted) stops at once on SIGTERM: it cancels every connection's application and drops the
sockets without a close frame (a browser sees 1006). And it may never exit: a REST call waiting
for its turn (``POST .../messages``) runs Django's sync middleware on a thread that waits for the
async view on the event loop; once the loop has stopped, that thread waits for ever, and the
interpreter joins it at exit (the chaos suite saw daphne "ignore" SIGTERM until SIGKILL 10 s later;
``agentflow_run`` then restarts the web server 10 s late).

Under daphne, the project's ASGI module calls ``agentflow.web.serving.adapt_daphne()``, and SIGTERM
drains instead:

1. ``draining()`` turns true: ``GET /api/health/ready`` answers 503, so a load balancer stops
   sending here, and a new WebSocket is closed with 1012;
2. every REST wait ends at once: its caller gets the usual 202 with the message (the turn goes on
   in a worker; the caller polls ``GET .../messages/{id}`` or resends with the same client id);
3. every open WebSocket gets an ``error`` frame ``server_restarting`` and a close with 1012 (service
   restart): the widget reconnects, to this server's successor or another one, and resumes;
4. once no HTTP request is in flight and no socket is open, or after ``WEB_DRAIN_SECONDS``, daphne
   stops as it would have.

A second SIGTERM, or SIGINT, stops at once. Everything here runs on the web process's event loop; this
module knows no server (``agentflow.web.serving`` ties it to daphne).
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

logger = logging.getLogger("agentflow.web")

T = TypeVar("T")

CLOSE_SERVICE_RESTART = 1012  # RFC 6455 registry: "Service Restart"


class Drainable(Protocol):
    async def close_for_restart(self) -> None: ...


_state: dict[str, Any] = {"draining": False, "in_flight": 0}
_sockets: weakref.WeakSet[Any] = weakref.WeakSet()
_waits: set[asyncio.Future[Any]] = set()


def draining() -> bool:
    return bool(_state["draining"])


def socket_opened(consumer: Drainable) -> None:
    _sockets.add(consumer)


def socket_closed(consumer: Drainable) -> None:
    _sockets.discard(consumer)


async def unless_draining(awaitable: Awaitable[T]) -> T | None:
    """Await ``awaitable``; None, at once, if the process starts draining first (or already is)."""
    waiter = asyncio.ensure_future(awaitable)
    if draining():
        waiter.cancel()
    _waits.add(waiter)
    try:
        await asyncio.wait({waiter})
    finally:
        _waits.discard(waiter)
        if not waiter.done():
            waiter.cancel()  # the caller itself was cancelled
    return None if waiter.cancelled() else waiter.result()


class TrackRequests:
    """ASGI middleware: counts HTTP requests in flight (the drain waits for them) and refuses a new
    WebSocket with 1012 while draining."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> Any:
        if scope["type"] == "websocket" and draining():
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": CLOSE_SERVICE_RESTART})
            return None
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        _state["in_flight"] += 1
        try:
            return await self.app(scope, receive, send)
        finally:
            _state["in_flight"] -= 1


async def drain(seconds: float) -> None:
    """Steps 1-3 of the module's list, then wait (up to ``seconds``) until nothing is in flight."""
    _state["draining"] = True
    sockets, waits = list(_sockets), list(_waits)
    logger.info(
        "draining: %d REST waits answered, %d sockets closed with 1012, %d requests in flight",
        len(waits),
        len(sockets),
        _state["in_flight"],
    )
    for waiter in waits:
        waiter.cancel()
    closing = [asyncio.ensure_future(consumer.close_for_restart()) for consumer in sockets]
    deadline = time.monotonic() + seconds
    # Polled: requests and sockets end in code that knows nothing of the drain.
    while time.monotonic() < deadline and (  # noqa: ASYNC110
        _state["in_flight"] or len(_sockets) or not all(c.done() for c in closing)
    ):
        await asyncio.sleep(0.05)
    if _state["in_flight"] or len(_sockets):
        logger.warning(
            "drain bound (%.0f s) reached: %d requests, %d sockets still open",
            seconds,
            _state["in_flight"],
            len(_sockets),
        )
