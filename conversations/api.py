"""REST routes for host backends: post a user's message, read their sessions, threads and messages.

Thin: parse, call one service or selector, serialize. The turn itself runs in a Celery worker.
"""

from __future__ import annotations

import logging
import uuid
from datetime import datetime
from typing import Any

import redis.exceptions
from asgiref.sync import sync_to_async
from django.db import connections
from django.http import HttpRequest
from ninja import Field, Router, Schema
from ninja.responses import Status
from pydantic import field_validator

from agentflow import drain
from agentflow.conf import conf
from agentflow.errors import Forbidden, InvalidInput
from agentflow.jobs import queue_turn
from agentflow.validation import MESSAGE_PATTERN, clean_user_id

from . import selectors
from .agents import AgentSettings, agent_settings, clean_agent_name, message_accept
from .chat_tokens import chat_token_create
from .models import ApiKey, EndUser, Message
from .schemas import responses
from .turn_results import turn_settled_clear, turn_settled_wait

logger = logging.getLogger("agentflow.api")
# Redis failing under the wait: the message is stored and queued, so the caller gets its current
# state (202: poll) rather than an error.
WAIT_ERRORS = (redis.exceptions.RedisError, ConnectionError, OSError)
TERMINAL = (Message.Status.DONE, Message.Status.FAILED)

router = Router(tags=["conversations"])


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
    agent: str


def _agent(request: HttpRequest, name: str | None) -> AgentSettings:
    """The agent a request addresses (the default one on the un-prefixed paths), checked against the
    API key's agent limit. Reads the agent's limits from its record; no agent is built here."""
    found = agent_settings(name=clean_agent_name(name or conf().DEFAULT_AGENT))
    key = getattr(request, "auth", None)
    if isinstance(key, ApiKey) and key.agent_id is not None and key.agent_id != found.id:
        raise Forbidden(f"this API key is limited to another agent than {found.name!r}")
    return found


def _user(request: HttpRequest, agent: str | None, user_id: str) -> EndUser:
    return selectors.user_get(agent_id=_agent(request, agent).id, external_id=clean_user_id(user_id))


def connections_release() -> None:
    """Give this thread's database connections back to the pool (those inside a transaction stay)."""
    for conn in connections.all(initialized_only=True):
        if not conn.in_atomic_block:
            conn.close()


def _accept_and_queue(
    request: HttpRequest, agent: str | None, user_id: str, payload: MessageIn, *, wait: float
) -> tuple[Any, bool, bool]:
    """Store the message and, for a new one, queue its turn: ``(received, queued, waiting)``.

    One call on the request's thread instead of one per step: each ``sync_to_async`` is a hop from
    the event loop to that thread and back (docs/operations.md, "Web process CPU"). A failed turn run
    again is queued by the caller, after its old end is cleared from Redis.
    """
    limits = _agent(request, agent)
    received = message_accept(
        limits=limits, user_id=user_id, message=payload.message, client_message_id=payload.client_message_id
    )
    waiting = wait > 0 and (received.run or received.message.status not in TERMINAL)
    queued = received.run and received.created
    if queued:  # with the agent, version and user: the worker need not read them again
        queue_turn(
            received.message.pk, agent=limits.name, version=limits.version, user_pk=received.message.user_id
        )
    if waiting and queued:
        # No database connection stays checked out of the pool while this request waits.
        connections_release()
    return received, queued, waiting


async def _post_message(
    request: HttpRequest, agent: str | None, user_id: str, payload: MessageIn
) -> Status[dict[str, Any]]:
    wait = conf().REST_WAIT_SECONDS if payload.wait_seconds is None else payload.wait_seconds
    received, queued, waiting = await sync_to_async(_accept_and_queue)(
        request, agent, user_id, payload, wait=wait
    )
    message = received.message
    if received.run and not queued:
        try:
            if waiting:  # a failed turn again: not its old end
                await turn_settled_clear(message_id=message.pk)
        except WAIT_ERRORS as exc:
            logger.warning("message %s: not waiting, Redis failed (%s)", message.pk, exc)
            waiting = False
        await sync_to_async(queue_turn)(message.pk)
    if waiting:
        # No database connection stays checked out of the pool while this request waits, and the
        # wait is on this message's own Redis list (conversations.turn_results), not on the user's
        # channel group: a turn that settled before the wait began is not missed either.
        if not queued:
            await sync_to_async(connections_release)()
        try:
            # A web process stopping (SIGTERM) answers at once: 202, the turn goes on in the worker.
            await drain.unless_draining(turn_settled_wait(message_id=message.pk, seconds=wait))
        except WAIT_ERRORS as exc:
            logger.warning("message %s: not waiting, Redis failed (%s)", message.pk, exc)
    result = await sync_to_async(selectors.turn_result_for)(message_id=message.pk)
    status = {Message.Status.DONE: 200, Message.Status.FAILED: 503}.get(result["status"], 202)
    return Status(status, result)


_POST_DOC = """Stores the message, runs its turn in a worker and waits up to ``wait_seconds`` for the reply.

200: the turn is done (the reply is in ``content``). 202: still running; poll the message's
``GET .../messages/{message_id}``. 503: the turn failed (the LLM was unavailable); the message is
kept, and sending it again with the same ``client_message_id`` retries it.
"""
_POST_RESPONSES = responses({200: TurnOut, 202: TurnOut, 503: TurnOut}, 403, 413, 429)


@router.post(
    "/agents/{agent}/users/{user_id}/messages",
    response=_POST_RESPONSES,
    summary="Send a user's message to an agent and get the turn result",
    description=_POST_DOC,
)
async def post_agent_message(
    request: HttpRequest, agent: str, user_id: str, payload: MessageIn
) -> Status[dict[str, Any]]:
    return await _post_message(request, agent, user_id, payload)


@router.post(
    "/users/{user_id}/messages",
    response=_POST_RESPONSES,
    summary="Send a user's message (the default agent) and get the turn result",
    description=_POST_DOC,
)
async def post_message(request: HttpRequest, user_id: str, payload: MessageIn) -> Status[dict[str, Any]]:
    return await _post_message(request, None, user_id, payload)


def _get_turn(request: HttpRequest, agent: str | None, user_id: str, message_id: str) -> dict[str, Any]:
    user = _user(request, agent, user_id)
    message = selectors.message_get_for_user(user=user, message_id=message_id)
    if message.role != Message.Role.USER:
        raise InvalidInput("message_id must name a user message", field="message_id")
    return selectors.turn_result(message=message)


@router.get(
    "/agents/{agent}/users/{user_id}/messages/{message_id}",
    response=responses({200: TurnOut}, 403),
    summary="The turn result of a user message",
)
def get_agent_turn(request: HttpRequest, agent: str, user_id: str, message_id: str) -> dict[str, Any]:
    return _get_turn(request, agent, user_id, message_id)


@router.get(
    "/users/{user_id}/messages/{message_id}",
    response=responses({200: TurnOut}, 403),
    summary="The turn result of a user message (the default agent)",
)
def get_turn(request: HttpRequest, user_id: str, message_id: str) -> dict[str, Any]:
    return _get_turn(request, None, user_id, message_id)


@router.get("/agents/{agent}/users/{user_id}/sessions", response=responses({200: list[SessionOut]}, 403))
def list_agent_sessions(request: HttpRequest, agent: str, user_id: str) -> Any:
    return list(selectors.sessions_for_user(user=_user(request, agent, user_id))[:100])


@router.get("/users/{user_id}/sessions", response=responses({200: list[SessionOut]}, 403))
def list_sessions(request: HttpRequest, user_id: str) -> Any:
    return list(selectors.sessions_for_user(user=_user(request, None, user_id))[:100])


def _list_threads(
    request: HttpRequest, agent: str | None, user_id: str, session_id: str | None, status: str | None
) -> Any:
    user = _user(request, agent, user_id)
    if status is not None and status not in ("open", "dormant", "resolved"):
        raise InvalidInput("status must be open, dormant or resolved", field="status")
    return list(selectors.threads_for_user(user=user, session_id=session_id, status=status)[:200])


@router.get("/agents/{agent}/users/{user_id}/threads", response=responses({200: list[ThreadOut]}, 403))
def list_agent_threads(
    request: HttpRequest, agent: str, user_id: str, session_id: str | None = None, status: str | None = None
) -> Any:
    return _list_threads(request, agent, user_id, session_id, status)


@router.get("/users/{user_id}/threads", response=responses({200: list[ThreadOut]}, 403))
def list_threads(
    request: HttpRequest, user_id: str, session_id: str | None = None, status: str | None = None
) -> Any:
    return _list_threads(request, None, user_id, session_id, status)


def _thread_messages(request: HttpRequest, agent: str | None, user_id: str, thread_id: str) -> Any:
    thread = selectors.thread_get_for_user(user=_user(request, agent, user_id), thread_id=thread_id)
    return list(selectors.messages_for_thread(thread=thread)[:1000])


@router.get(
    "/agents/{agent}/users/{user_id}/threads/{thread_id}/messages",
    response=responses({200: list[MessageOut]}, 403),
)
def list_agent_thread_messages(request: HttpRequest, agent: str, user_id: str, thread_id: str) -> Any:
    return _thread_messages(request, agent, user_id, thread_id)


@router.get(
    "/users/{user_id}/threads/{thread_id}/messages",
    response=responses({200: list[MessageOut]}, 403),
)
def list_thread_messages(request: HttpRequest, user_id: str, thread_id: str) -> Any:
    return _thread_messages(request, None, user_id, thread_id)


def _chat_token(request: HttpRequest, agent: str | None, user_id: str) -> dict[str, Any]:
    limits = _agent(request, agent)
    return {
        "token": chat_token_create(agent=limits.name, external_id=user_id),
        "expires_in": conf().CHAT_TOKEN_TTL_SECONDS,
        "websocket_path": "/ws/chat/",
        "agent": limits.name,
    }


_TOKEN_SUMMARY = "A signed, expiring token for this end user's WebSocket chat with one agent"


@router.post(
    "/agents/{agent}/users/{user_id}/chat-token",
    response=responses({200: ChatTokenOut}, 403),
    summary=_TOKEN_SUMMARY,
)
def create_agent_chat_token(request: HttpRequest, agent: str, user_id: str) -> dict[str, Any]:
    return _chat_token(request, agent, user_id)


@router.post(
    "/users/{user_id}/chat-token",
    response=responses({200: ChatTokenOut}, 403),
    summary=_TOKEN_SUMMARY + " (the default agent)",
)
def create_chat_token(request: HttpRequest, user_id: str) -> dict[str, Any]:
    return _chat_token(request, None, user_id)
