"""WebSocket chat: ``/ws/chat/?token=<chat token>``.

Client -> server frames (JSON): ``{"type": "message", "message": "...", "client_message_id": "..."}``,
``{"type": "ping"}``. Server -> client: ``{"type": "ack", ...}`` when a message is stored,
``{"type": "turn", ...}`` with the turn result when the reply is ready, ``{"type": "error", "code",
"message"}`` for a bad frame (the connection stays open), ``{"type": "pong"}``; and the hand-off
events ``human_joined``, ``human_message`` and ``bot_back`` (a stored message's ``id``,
``thread_id``, ``role``, ``content``, ``created_at``).

The consumer only stores the message and queues the turn; the Celery worker runs it and the
result comes back through the user's channel-layer group.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.generic.websocket import AsyncWebsocketConsumer

from agentflow import pipeline
from agentflow.defaults import get_agent
from agentflow.errors import InvalidInput, RateLimited

from .api import chat_token_user
from .events import user_group
from .models import Message
from .services import user_get_or_create
from .tasks import enqueue_turn

logger = logging.getLogger("agentflow.ws")

MAX_FRAME_BYTES = 64 * 1024
CLOSE_UNAUTHORIZED = 4401


class ChatConsumer(AsyncWebsocketConsumer):
    user_id: str
    user_pk: int
    group: str

    async def connect(self) -> None:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        token = (query.get("token") or [""])[0]
        external_id = chat_token_user(token) if token else None
        if external_id is None:
            # Accept first, then close with 4401: a close before accepting reaches browsers as a bare
            # HTTP 403, with no code or reason a widget could act on (fetch a new token).
            await self.accept()
            await self._error("unauthorized", "the chat token is missing, invalid or expired")
            await self.close(code=CLOSE_UNAUTHORIZED)
            return
        user = await database_sync_to_async(user_get_or_create)(external_id=external_id)
        self.user_id, self.user_pk = external_id, user.pk
        self.group = user_group(user.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self._send({"type": "ready", "user_id": external_id, "protocol": 1})

    async def disconnect(self, code: int) -> None:
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)

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
        if kind == "ping":
            await self._send({"type": "pong"})
        elif kind == "message":
            await self._on_message(frame)
        else:
            await self._error("unknown_type", f"unknown frame type {kind!r}; expected 'message' or 'ping'")

    async def _on_message(self, frame: dict[str, Any]) -> None:
        client_id = frame.get("client_message_id")
        try:
            agent = await database_sync_to_async(get_agent)()
            message, created = await database_sync_to_async(pipeline.accept)(
                agent, user_id=self.user_id, message=frame.get("message"), client_message_id=client_id
            )
        except InvalidInput as exc:
            await self._error(exc.code, str(exc), field=exc.field, client_message_id=client_id)
            return
        except RateLimited as exc:
            await self._error(exc.code, str(exc), retry_after=exc.retry_after, client_message_id=client_id)
            return
        await self._send(
            {"type": "ack", "message_id": str(message.pk), "client_message_id": client_id, "duplicate": not created}
        )
        if created or message.status == Message.Status.FAILED:  # a resent failed message is retried
            await database_sync_to_async(enqueue_turn)(message.pk)

    async def chat_event(self, event: dict[str, Any]) -> None:
        """A live event for this user from the channel layer (a finished turn, an error)."""
        body = dict(event["event"])
        kind = body.pop("kind", "event")
        if kind == "turn":
            await self._send({"type": "turn", **body["turn"]})
        else:
            await self._send({"type": kind, **body})
