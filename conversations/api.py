"""REST routes for host backends: post a user's message, read their sessions, threads and messages.

Thin: parse, call one service or selector, serialize. The turn itself runs in a Celery worker.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from datetime import datetime
from typing import Any

from asgiref.sync import sync_to_async
from channels.layers import get_channel_layer
from django.conf import settings
from django.http import HttpRequest
from ninja import Field, Router, Schema
from ninja.responses import Status
from pydantic import field_validator

from agentflow import pipeline
from agentflow.defaults import get_agent
from agentflow.errors import InvalidInput
from agentflow.validation import MESSAGE_PATTERN, clean_user_id

from . import selectors
from .chat_tokens import CHAT_TOKEN_SALT, chat_token_create, chat_token_user  # noqa: F401 (the consumer imports them)
from .events import user_group
from .models import Message
from .tasks import enqueue_turn

router = Router(tags=["conversations"])


class ErrorDetail(Schema):
    code: str
    message: str
    field: str | None = None


class ErrorOut(Schema):
    error: ErrorDetail


def responses(ok: dict[int, Any], *extra: int) -> dict[int, Any]:
    """A route's responses: its own, the common errors (400, 401, 404, 422) and ``extra`` codes.

    The user id, id and filter parameters are described in the schema by agentflow_project.api.
    """
    return {**ok, **{code: ErrorOut for code in (400, 401, 404, 422, *extra)}}


CLIENT_ID_SCHEMA_PATTERN = r"^[A-Za-z0-9_.:\-]{0,100}$"  # CLIENT_ID_RE, or "" (none)


# The schema documents what agentflow.validation checks; the checks stay there, so that a bad value
# gets its clear 400 (invalid_input) rather than a pydantic 422 quoting a long pattern.
class MessageIn(Schema):
    message: str = Field(
        ...,
        description=(
            "The user's message text. Control characters (except newline and tab) are dropped and the"
            " text is trimmed; something must remain. At most input_config.max_message_chars characters."
        ),
        json_schema_extra={"minLength": 1, "pattern": MESSAGE_PATTERN},
    )
    client_message_id: str | None = Field(
        None,
        description="Your id for this message; sending it again returns the same turn (retried if it failed).",
        json_schema_extra={"pattern": CLIENT_ID_SCHEMA_PATTERN},
    )
    wait_seconds: float | None = Field(
        None,
        ge=0,
        le=120,
        description="How long to wait for the reply (default 30). 0: return at once (202).",
    )

    @field_validator("wait_seconds", mode="before")
    @classmethod
    def _no_bool(cls, value: Any) -> Any:
        # pydantic's lax mode would read true as 1 second.
        if isinstance(value, bool):
            raise ValueError("must be a number, not true/false")
        return value


class TurnOut(Schema):
    status: str
    message_id: str
    user_id: str
    session_id: str
    thread_id: str | None = None
    thread_event: str | None = None
    thread_confidence: float | None = None
    intent: str | None = None
    confidence: float | None = None
    runners_up: list[dict[str, Any]] = []
    escalated: bool = False
    content: str | None = None
    reply_id: str | None = None
    offline: bool | None = None
    model: str | None = None
    usage: dict[str, int] | None = None
    latency_ms: float | None = None
    llm_latency_ms: float | None = None
    memories_used: list[dict[str, Any]] = []
    handled_by: str | None = None
    reply_confidence: float | None = None
    error: str | None = None


class SessionOut(Schema):
    id: uuid.UUID
    status: str
    started_at: datetime
    last_activity_at: datetime
    expires_at: datetime


class ThreadOut(Schema):
    id: uuid.UUID
    session_id: uuid.UUID
    status: str
    topic: str
    intent: str
    escalated: bool
    opened_at: datetime
    last_activity_at: datetime
    resolved_at: datetime | None
    resolution: str


class MessageOut(Schema):
    id: uuid.UUID
    thread_id: uuid.UUID | None
    role: str
    content: str
    status: str
    thread_event: str
    intent: str
    confidence: float | None
    escalated: bool
    offline: bool
    usage: dict[str, Any]
    latency_ms: float | None
    created_at: datetime


class ChatTokenOut(Schema):
    token: str
    expires_in: int
    websocket_path: str


def _turn(message_id: Any) -> dict[str, Any]:
    message = Message.objects.select_related("user").get(pk=message_id)
    return selectors.turn_result(message=message)


async def _wait_for_turn(channel_layer: Any, channel: str, message_id: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            event = await asyncio.wait_for(channel_layer.receive(channel), remaining)
        except TimeoutError:
            return
        body = event.get("event", {})
        kind = body.get("kind")
        if kind == "turn" and (body.get("turn") or {}).get("message_id") == message_id:
            return
        if kind == "error" and body.get("message_id") == message_id:
            return  # the turn failed for good


@router.post(
    "/users/{user_id}/messages",
    response=responses({200: TurnOut, 202: TurnOut, 503: TurnOut}, 413, 429),
    summary="Send a user's message and get the turn result",
)
async def post_message(request: HttpRequest, user_id: str, payload: MessageIn) -> Status[dict[str, Any]]:
    """Stores the message, runs its turn in a worker and waits up to ``wait_seconds`` for the reply.

    200: the turn is done (the reply is in ``content``). 202: still running; poll
    ``GET /api/users/{user_id}/messages/{message_id}``. 503: the turn failed (the LLM was
    unavailable); the message is kept, and sending it again with the same ``client_message_id``
    retries it.
    """
    agent = await sync_to_async(get_agent)()
    message, created = await sync_to_async(pipeline.accept)(
        agent, user_id=user_id, message=payload.message, client_message_id=payload.client_message_id
    )
    message_id = str(message.pk)
    wait = settings.AGENTFLOW["REST_WAIT_SECONDS"] if payload.wait_seconds is None else payload.wait_seconds
    layer = get_channel_layer()
    # Sending a failed message's client_message_id again retries its turn (the task is idempotent).
    run = created or message.status == Message.Status.FAILED
    if wait > 0 and layer is not None and (run or message.status != Message.Status.DONE):
        channel = await layer.new_channel()
        group = user_group(message.user_id)
        await layer.group_add(group, channel)
        try:
            if run:
                await sync_to_async(enqueue_turn)(message.pk)
            await _wait_for_turn(layer, channel, message_id, wait)
        finally:
            await layer.group_discard(group, channel)
    elif run:
        await sync_to_async(enqueue_turn)(message.pk)
    result = await sync_to_async(_turn)(message.pk)
    status = {Message.Status.DONE: 200, Message.Status.FAILED: 503}.get(result["status"], 202)
    return Status(status, result)


@router.get(
    "/users/{user_id}/messages/{message_id}",
    response=responses({200: TurnOut}),
    summary="The turn result of a user message",
)
def get_turn(request: HttpRequest, user_id: str, message_id: str) -> dict[str, Any]:
    user = selectors.user_get(external_id=clean_user_id(user_id))
    message = selectors.message_get_for_user(user=user, message_id=message_id)
    if message.role != Message.Role.USER:
        raise InvalidInput("message_id must name a user message", field="message_id")
    return selectors.turn_result(message=message)


@router.get("/users/{user_id}/sessions", response=responses({200: list[SessionOut]}))
def list_sessions(request: HttpRequest, user_id: str) -> Any:
    user = selectors.user_get(external_id=clean_user_id(user_id))
    return list(selectors.sessions_for_user(user=user)[:100])


@router.get("/users/{user_id}/threads", response=responses({200: list[ThreadOut]}))
def list_threads(
    request: HttpRequest, user_id: str, session_id: str | None = None, status: str | None = None
) -> Any:
    user = selectors.user_get(external_id=clean_user_id(user_id))
    if status is not None and status not in ("open", "dormant", "resolved"):
        raise InvalidInput("status must be open, dormant or resolved", field="status")
    return list(selectors.threads_for_user(user=user, session_id=session_id, status=status)[:200])


@router.get("/users/{user_id}/threads/{thread_id}/messages", response=responses({200: list[MessageOut]}))
def list_thread_messages(request: HttpRequest, user_id: str, thread_id: str) -> Any:
    user = selectors.user_get(external_id=clean_user_id(user_id))
    thread = selectors.thread_get_for_user(user=user, thread_id=thread_id)
    return list(selectors.messages_for_thread(thread=thread)[:1000])


@router.post(
    "/users/{user_id}/chat-token",
    response=responses({200: ChatTokenOut}),
    summary="A signed, expiring token for this end user's WebSocket chat",
)
def create_chat_token(request: HttpRequest, user_id: str) -> dict[str, Any]:
    return {
        "token": chat_token_create(external_id=user_id),
        "expires_in": settings.AGENTFLOW["CHAT_TOKEN_TTL_SECONDS"],
        "websocket_path": "/ws/chat/",
    }
