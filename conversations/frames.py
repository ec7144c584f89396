"""JSON frames over a WebSocket: what the chat and the staff consumers share.

A consumer lists its frame handlers in ``FRAMES`` (frame type -> coroutine method name); a frame
that is not a JSON object with a known ``type`` gets an ``error`` frame and the connection stays
open (docs/protocol.md, "Errors"). So does JSON nested too deeply or holding a lone surrogate
(``"\\ud800"``): Python's decoder accepts the latter, but no database or UTF-8 peer can take it.
Every frame, whatever its type (ping, resume and typing too), counts against the connection's frame
bucket (``AGENTFLOW["RATE_LIMITS"]["WS_FRAMES_PER_SECOND"]``, ``WS_FRAME_BURST``): a frame over it
gets a ``rate_limited`` error frame and is dropped, and a client that sends
``WS_FRAME_OVERFLOW_CLOSE`` frames in a row over it is closed with 4429. Both answer ``resume`` the same way, from the database, for the
end user whose conversation they carry (``history_owner``).

A component that fails under a connection (PostgreSQL, Redis, the channel layer:
``agentflow.unavailable``), while connecting or handling any frame or event, ends it with an
``error`` frame ``unavailable`` (with ``retry_after`` seconds) and close code 1013 (try again later),
instead of a dropped socket.
"""

from __future__ import annotations

import asyncio
import json
import logging
from contextlib import suppress
from typing import Any, ClassVar

from channels.consumer import get_handler_name
from channels.generic.websocket import AsyncWebsocketConsumer

from agentflow import drain
from agentflow.conf import conf
from agentflow.errors import NotFound
from agentflow.loops import run_db
from agentflow.unavailable import (
    UNAVAILABLE_ERRORS,
    WS_CLOSE_TRY_AGAIN_LATER,
    retry_after_seconds,
    unavailable_message,
)
from agentflow.validation import has_lone_surrogate

from .events import message_payload
from .models import EndUser
from .ratelimit import FrameBucket
from .selectors import messages_after

logger = logging.getLogger("agentflow.ws")

MAX_FRAME_BYTES = 64 * 1024
CLOSE_TOO_MANY = 4429  # frame flood, or too many connections for one user
HISTORY_LIMIT = 200  # messages per "history" frame; "complete": false says more follow
MAX_FRAME_DEPTH = 32  # nesting of arrays/objects; no frame of the protocol goes past 3


def json_problem(value: Any) -> str | None:
    """Why a decoded JSON value cannot be taken (too deep, a lone surrogate), or None when it can.

    Iterative, so a hostile value cannot exhaust the stack here either.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if has_lone_surrogate(item):
                return "the frame holds a lone surrogate (\\ud800-\\udfff); strings must be valid Unicode"
            continue
        if isinstance(item, (dict, list)):
            if depth >= MAX_FRAME_DEPTH:
                return f"the frame is nested deeper than {MAX_FRAME_DEPTH} levels"
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return None


def history_page(*, user: EndUser, after: object | None) -> dict[str, Any]:
    """The ``history`` frame's body: the user's messages after ``after`` (the latest when None).

    Raises:
        NotFound: ``after`` is not a message of this user.
    """
    messages, complete = messages_after(user=user, after=after, limit=HISTORY_LIMIT)
    return {"messages": [message_payload(m) for m in messages], "complete": complete}


class JsonFrameConsumer(AsyncWebsocketConsumer):
    FRAMES: ClassVar[dict[str, str]] = {}
    _frames: FrameBucket | None = None
    _closing: bool = False
    _accepted: bool = False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        except UNAVAILABLE_ERRORS as exc:
            logger.warning("websocket closed 1013: a component is down (%s: %s)", type(exc).__name__, exc)
            if not hasattr(self, "base_send"):
                self.base_send = send
            await self._close_unavailable(exc)

    async def dispatch(self, message: dict[str, Any]) -> None:
        """Run the handler of ``message`` (a client frame or a channel-layer event).

        channels' own ``dispatch`` first awaits ``aclose_old_connections()`` for every message: a hop
        to the process's one thread-sensitive thread and back, per frame and per streamed event,
        every consumer of the process queueing on that one thread. These consumers never use a
        database connection there: ``run_db`` gives its thread's connection back after each call
        (``agentflow.loops``), and ``database_sync_to_async`` closes around its own calls. Skipping
        it cut the web process's CPU per WebSocket turn (docs/operations.md, "Web process CPU").
        """
        handler = getattr(self, get_handler_name(message), None)
        if handler is None:
            raise ValueError(f"No handler for message type {message['type']}")
        await handler(message)

    async def _close_unavailable(self, exc: Exception) -> None:
        """Tell the client which component is down and close with 1013; then release what can be."""
        if not self._closing:
            self._closing = True
            with suppress(Exception):  # the client may be gone already
                if not self._accepted:
                    await self.accept()
                await self._error("unavailable", unavailable_message(exc), retry_after=retry_after_seconds())
                await self.close(code=WS_CLOSE_TRY_AGAIN_LATER)
        with suppress(Exception):  # best effort: leave the group, give back the connection count
            await asyncio.wait_for(self.disconnect(WS_CLOSE_TRY_AGAIN_LATER), 2)

    async def accept(self, subprotocol: str | None = None, headers: Any = None) -> None:
        self._accepted = True
        await super().accept(subprotocol=subprotocol, headers=headers)
        drain.socket_opened(self)

    async def websocket_disconnect(self, message: dict[str, Any]) -> None:
        drain.socket_closed(self)
        await super().websocket_disconnect(message)

    async def close_for_restart(self) -> None:
        """The web process is stopping (``agentflow.drain``): say so and close with 1012."""
        if self._closing:
            return
        self._closing = True
        with suppress(Exception):  # the client may be gone already
            await self._error("server_restarting", "the server is restarting; reconnect", retry_after=1)
            await self.close(code=drain.CLOSE_SERVICE_RESTART)

    async def _flooded(self) -> bool:
        """Count the frame against the connection's bucket; True if it must be dropped."""
        if self._closing:
            return True
        if self._frames is None:
            limits = conf().RATE_LIMITS
            self._frames = FrameBucket(
                per_second=limits["WS_FRAMES_PER_SECOND"], burst=limits["WS_FRAME_BURST"]
            )
        if self._frames.take():
            return False
        if self._frames.overflow >= conf().RATE_LIMITS["WS_FRAME_OVERFLOW_CLOSE"]:
            self._closing = True
            await self._error("too_many_frames", "too many frames over the limit; closing")
            await self.close(code=CLOSE_TOO_MANY)
            return True
        await self._error(
            "rate_limited", "too many frames; this one was dropped", retry_after=self._frames.retry_after()
        )
        return True

    async def _send(self, payload: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(payload, default=str))

    async def _error(self, code: str, message: str, **extra: Any) -> None:
        await self._send({"type": "error", "code": code, "message": message, **extra})

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        if await self._flooded():
            return
        if text_data is None:
            await self._error("bad_frame", "send JSON text frames")
            return
        if len(text_data.encode("utf-8")) > MAX_FRAME_BYTES:
            await self._error("frame_too_large", f"frames are limited to {MAX_FRAME_BYTES} bytes")
            return
        try:
            frame = json.loads(text_data)
        except json.JSONDecodeError:
            await self._error("bad_json", "the frame is not valid JSON")
            return
        except RecursionError:  # the C decoder gives up on deep nesting (~1,000 levels)
            await self._error("bad_json", f"the frame is nested deeper than {MAX_FRAME_DEPTH} levels")
            return
        if (problem := json_problem(frame)) is not None:
            await self._error("bad_json", problem)
            return
        if not isinstance(frame, dict):
            await self._error("bad_frame", "a frame must be a JSON object with a 'type'")
            return
        kind = frame.get("type")
        method = self.FRAMES.get(kind) if isinstance(kind, str) else None
        if method is None:
            await self._error(
                "unknown_type", f"unknown frame type {kind!r}; expected one of: {', '.join(self.FRAMES)}"
            )
            return
        await getattr(self, method)(frame)

    def history_owner(self) -> EndUser:
        """The end user whose conversation this connection carries."""
        raise NotImplementedError

    async def _on_resume(self, frame: dict[str, Any]) -> None:
        after = frame.get("after")
        if after is not None and not isinstance(after, str):
            await self._error("bad_frame", "'after' must be a message id or null", field="after")
            return
        try:
            page = await run_db(history_page, user=self.history_owner(), after=after)
        except NotFound as exc:
            await self._error("not_found", str(exc), field="after")
            return
        await self._send({"type": "history", **page})
