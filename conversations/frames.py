"""JSON frames over a WebSocket: the parsing and error replies both consumers share.

A consumer lists its frame handlers in ``FRAMES`` (frame type -> coroutine method name); a frame
that is not a JSON object with a known ``type`` gets an ``error`` frame and the connection stays
open (docs/protocol.md, "Errors").
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from channels.generic.websocket import AsyncWebsocketConsumer

MAX_FRAME_BYTES = 64 * 1024


class JsonFrameConsumer(AsyncWebsocketConsumer):
    FRAMES: ClassVar[dict[str, str]] = {}

    async def _send(self, payload: dict[str, Any]) -> None:
        await self.send(text_data=json.dumps(payload, default=str))

    async def _error(self, code: str, message: str, **extra: Any) -> None:
        await self._send({"type": "error", "code": code, "message": message, **extra})

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
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
        if not isinstance(frame, dict):
            await self._error("bad_frame", "a frame must be a JSON object with a 'type'")
            return
        kind = frame.get("type")
        method = self.FRAMES.get(kind) if isinstance(kind, str) else None
        if method is None:
            await self._error("unknown_type", f"unknown frame type {kind!r}; expected one of: {', '.join(self.FRAMES)}")
            return
        await getattr(self, method)(frame)
