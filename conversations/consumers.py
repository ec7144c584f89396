"""WebSocket chat for end users: ``/ws/chat/?token=<chat token>``, protocol version 1.

docs/protocol.md is the specification (frames, errors, close codes, reconnecting). The consumer
parses frames and calls services; it never runs a turn. It stores the message and queues the turn;
the Celery worker runs it and streams the reply back through the user's channel-layer group, which
every connection of the user (and every staff page watching them) listens on.
"""

from __future__ import annotations

import logging
import time
from typing import Any
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async
from channels.db import database_sync_to_async
from django.conf import settings
from django.utils import timezone

from agentflow import pipeline
from agentflow.defaults import get_agent
from agentflow.errors import InvalidInput, NotFound, RateLimited

from . import selectors, services
from .chat_tokens import ChatTokenClaims, chat_token_claims, chat_token_revoked
from .events import STAFF_ONLY, apublish, user_group
from .frames import CLOSE_TOO_MANY, JsonFrameConsumer
from .models import EndUser, Message
from .ratelimit import ws_connection_acquire, ws_connection_release
from .tasks import enqueue_turn

logger = logging.getLogger("agentflow.ws")

PROTOCOL_VERSION = 1
TYPING_REPEAT_SECONDS = 3.0  # a held "typing" state is passed on at most this often
CLOSE_BAD_VERSION = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_ERASED = 4410  # the user was erased: their conversation is gone, do not reconnect
CONNECTION_REFRESH_SECONDS = 30.0  # how often a busy connection renews its place in the count


class ChatConsumer(JsonFrameConsumer):
    FRAMES = {
        "message": "_on_message",
        "typing": "_on_typing",
        "ack": "_on_ack",
        "resume": "_on_resume",
        "ping": "_on_ping",
    }
    user: EndUser
    group: str
    claims: ChatTokenClaims
    _typing: tuple[bool, float] = (False, 0.0)
    _counted_at: float = 0.0

    async def connect(self) -> None:
        query = parse_qs(self.scope.get("query_string", b"").decode("latin-1"))
        # Accept first, then close with a code: a close before accepting reaches browsers as a bare
        # HTTP 403, with no code or reason a widget could act on (fetch a new token, give up).
        version = (query.get("v") or [str(PROTOCOL_VERSION)])[0]
        if version != str(PROTOCOL_VERSION):
            await self._refuse(
                CLOSE_BAD_VERSION,
                "unsupported_version",
                f"protocol version {version!r} is not supported; this server speaks {PROTOCOL_VERSION}",
            )
            return
        token = (query.get("token") or [""])[0]
        claims = chat_token_claims(token) if token else None
        if claims is None:
            await self._refuse(
                CLOSE_UNAUTHORIZED, "unauthorized", "the chat token is missing, invalid or expired"
            )
            return
        if await sync_to_async(chat_token_revoked, thread_sensitive=False)(claims=claims):
            await self._refuse(CLOSE_UNAUTHORIZED, "token_revoked", "this chat token was revoked")
            return
        external_id = claims.external_id
        limit = settings.AGENTFLOW["RATE_LIMITS"]["WS_CONNECTIONS_PER_USER"]
        if not await sync_to_async(ws_connection_acquire, thread_sensitive=False)(
            user_id=external_id, channel=self.channel_name, limit=limit
        ):
            await self._refuse(
                CLOSE_TOO_MANY, "too_many_connections", f"at most {limit} open connections per user"
            )
            return
        self.claims, self._counted_at = claims, time.monotonic()
        self.user = await database_sync_to_async(services.user_get_or_create)(external_id=external_id)
        self.group = user_group(self.user.pk)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        await self._send(
            {
                "type": "ready",
                "protocol": PROTOCOL_VERSION,
                "user_id": external_id,
                "server_time": timezone.now().isoformat(),
            }
        )

    async def _refuse(self, code: int, error: str, message: str) -> None:
        await self.accept()
        await self._error(error, message)
        await self.close(code=code)

    async def disconnect(self, code: int) -> None:
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)
        if getattr(self, "claims", None) is not None:
            await sync_to_async(ws_connection_release, thread_sensitive=False)(
                user_id=self.claims.external_id, channel=self.channel_name
            )

    async def receive(self, text_data: str | None = None, bytes_data: bytes | None = None) -> None:
        now = time.monotonic()
        if (
            getattr(self, "claims", None) is not None and now - self._counted_at > CONNECTION_REFRESH_SECONDS
        ):  # still open: keep counting it
            self._counted_at = now
            await sync_to_async(ws_connection_acquire, thread_sensitive=False)(
                user_id=self.claims.external_id, channel=self.channel_name, limit=1_000_000
            )
        await super().receive(text_data=text_data, bytes_data=bytes_data)

    async def _close_erased(self) -> None:
        if not self._closing:
            self._closing = True
            await self._error("user_erased", "this user's data was erased; the conversation is closed")
            await self.close(code=CLOSE_ERASED)

    async def chat_erased(self, event: dict[str, Any]) -> None:
        """The user was erased (``memory.privacy.user_erase``): close with 4410."""
        await self._close_erased()

    async def _on_ping(self, frame: dict[str, Any]) -> None:
        await self._send({"type": "pong"})

    async def _on_message(self, frame: dict[str, Any]) -> None:
        client_id = frame.get("client_message_id")
        # Erased meanwhile (the close may still be on its way): store nothing, never re-create the user.
        if await sync_to_async(chat_token_revoked, thread_sensitive=False)(claims=self.claims):
            await self._close_erased()
            return
        try:
            agent = await database_sync_to_async(get_agent)()
            message, created = await database_sync_to_async(pipeline.accept)(
                agent,
                user_id=self.user.external_id,
                message=frame.get("message"),
                client_message_id=client_id,
            )
        except InvalidInput as exc:
            await self._error(exc.code, str(exc), field=exc.field, client_message_id=client_id)
            return
        except RateLimited as exc:
            await self._error(exc.code, str(exc), retry_after=exc.retry_after, client_message_id=client_id)
            return
        await self._send(
            {
                "type": "ack",
                "message_id": str(message.pk),
                "client_message_id": client_id,
                "duplicate": not created,
            }
        )
        if created or message.status == Message.Status.FAILED:  # a resent failed message is retried
            await database_sync_to_async(enqueue_turn)(message.pk)
        elif message.status == Message.Status.DONE:  # the client may have missed the reply: send it again
            turn = await database_sync_to_async(_turn_of)(message)
            await self._send({"type": "turn", **turn})

    async def _on_typing(self, frame: dict[str, Any]) -> None:
        state = frame.get("state")
        if not isinstance(state, bool):
            await self._error("bad_frame", "'state' must be true or false", field="state")
            return
        now = time.monotonic()
        last_state, last_sent = self._typing
        if state == last_state and now - last_sent < TYPING_REPEAT_SECONDS:
            return  # held state, recently passed on: nothing new for staff
        self._typing = (state, now)
        await apublish(user_pk=self.user.pk, event={"kind": "typing", "role": "user", "state": state})

    async def _on_ack(self, frame: dict[str, Any]) -> None:
        message_id = frame.get("message_id")
        if not isinstance(message_id, str):
            await self._error("bad_frame", "'message_id' must be a message id", field="message_id")
            return
        try:
            message = await database_sync_to_async(services.user_mark_read)(
                user=self.user, message_id=message_id
            )
        except NotFound as exc:
            await self._error("not_found", str(exc), field="message_id")
            return
        await apublish(user_pk=self.user.pk, event={"kind": "seen", "message_id": str(message.pk)})

    def history_owner(self) -> EndUser:
        return self.user

    async def chat_event(self, event: dict[str, Any]) -> None:
        """A live event for this user from the channel layer (a delta, a finished turn, staff...)."""
        body = dict(event["event"])
        kind = body.pop("kind", "event")
        if kind in STAFF_ONLY or (kind == "typing" and body.get("role") == "user"):
            return  # the user's own typing and read position are for staff pages
        if kind == "turn":
            await self._send({"type": "turn", **body["turn"]})
        else:
            await self._send({"type": kind, **body})


def _turn_of(message: Message) -> dict[str, Any]:
    message = Message.objects.select_related("user").get(pk=message.pk)
    return selectors.turn_result(message=message)
