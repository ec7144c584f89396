"""What the web process needs from daphne beyond what daphne does: a drain on SIGTERM and the
standard close codes. The project's ASGI module calls ``adapt_daphne()``; a host project's should too.

- **SIGTERM drains** (``agentflow.drain``): REST waits answered, sockets closed with 1012, then
  daphne stops as it would have. Without it daphne could hang at exit (see ``agentflow.drain``).
- **Close codes 1011-1014 reach the client.** daphne closes a socket through autobahn's
  ``sendClose``, which refuses every code but 1000 and 3000-4999; RFC 6455 and the IANA registry give
  servers 1011 (internal error), 1012 (service restart), 1013 (try again later) and 1014. The
  refusal raised inside the application's ``close()``: the client got the ``error`` frame, then a
  socket that stayed open with nobody behind it, where the protocol (docs/protocol.md) promises
  1013 while a component is down, and 1012 when the server restarts.

Nothing happens outside daphne (another ASGI server, the test client) or off the main thread (the
browser tests serve the application from daphne in a thread).
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
import threading
from typing import Any

from agentflow import drain
from agentflow.conf import conf

logger = logging.getLogger("agentflow.web")

SERVER_CLOSE_CODES = frozenset({1011, 1012, 1013, 1014})  # registered codes autobahn will not send


def adapt_daphne() -> bool:
    """Under daphne (its server module imported, this the main thread): adapt it; True if so."""
    if "daphne.server" not in sys.modules or threading.current_thread() is not threading.main_thread():
        return False
    _send_server_close_codes()
    _drain_on_sigterm()
    return True


def _send_server_close_codes() -> None:
    from daphne import ws_protocol

    base = ws_protocol.WebSocketFactory.protocol
    if getattr(base, "agentflow_close_codes", False):
        return

    class WebSocketProtocol(base):  # type: ignore[misc,valid-type]
        agentflow_close_codes = True

        def serverClose(self, code: int | None = None) -> None:
            if code in SERVER_CLOSE_CODES:
                self.sendCloseFrame(code=code, isReply=False)  # sendClose minus its code check
            else:
                super().serverClose(code=code)

    ws_protocol.WebSocketFactory.protocol = WebSocketProtocol


def _drain_on_sigterm() -> None:
    from twisted.internet import reactor as twisted_reactor

    reactor: Any = twisted_reactor

    def on_sigterm(signum: int, frame: Any) -> None:
        if drain.draining():  # a second signal: stop now
            reactor.callFromThread(reactor.stop)
        else:
            reactor.callFromThread(start)

    def start() -> None:
        task = asyncio.ensure_future(drain.drain(conf().WEB_DRAIN_SECONDS))
        task.add_done_callback(lambda _: reactor.stop() if reactor.running else None)

    def take_over() -> None:  # once the reactor runs: after Twisted installed its own handlers
        if threading.current_thread() is threading.main_thread():  # (a reactor in a thread has none)
            signal.signal(signal.SIGTERM, on_sigterm)

    reactor.callWhenRunning(take_over)
