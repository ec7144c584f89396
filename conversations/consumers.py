"""WebSocket chat for end users: ``/ws/chat/?token=<chat token>``, protocol version 1.

docs/protocol.md is the specification (frames, errors, close codes, reconnecting). The consumer
parses frames and calls services; it never runs a turn. It stores the message and queues the turn;
the Celery worker runs it and streams the reply back through the user's channel-layer group, which
every connection of the user (and every staff page watching them) listens on.
"""

from __future__ import annotations

import logging
import time
from contextlib import suppress
from functools import partialmethod
from typing import Any, NamedTuple
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async
from django.contrib.auth import get_user_model
from django.utils import timezone

from agentflow import logs, metrics
from agentflow.conf import conf
from agentflow.errors import InvalidInput, NotFound, RateLimited
from agentflow.jobs import queue_turn
from agentflow.loops import run_db

from . import selectors, services
from .agents import AgentSettings, HeldLimits, Received, agent_settings, message_accept_held
from .audit import audit_scope
from .chat_tokens import ChatTokenClaims, chat_token_claims, chat_token_revoked
from .console.queue import inbox_row_by_id, row_payload
from .events import (
    STAFF_ONLY,
    STAFF_QUEUE_GROUP,
    apublish,
    events_of,
    message_payload,
    skips_members,
    user_group,
)
from .frames import CLOSE_TOO_MANY, JsonFrameConsumer
from .handoff import escalation_claim, escalation_release, escalation_resolve, staff_reply
from .live import escalations_for_staff, may_act, may_watch, staff_group
from .models import EndUser, Escalation, Message
from .ratelimit import ws_connection_acquire, ws_connection_release
from .selectors import thread_get_for_user

logger = logging.getLogger("agentflow.ws")

PROTOCOL_VERSION = 1
TYPING_REPEAT_SECONDS = 3.0  # a held "typing" state is passed on at most this often
CLOSE_BAD_VERSION = 4400
CLOSE_UNAUTHORIZED = 4401
CLOSE_ERASED = 4410  # the user was erased: their conversation is gone, do not reconnect
CONNECTION_REFRESH_SECONDS = 30.0  # how often a busy connection renews its place in the count


class _Refusal(NamedTuple):
    """A chat connection refused while opening: its close code, error code and message."""

    code: int
    error: str
    message: str


def _open(*, claims: ChatTokenClaims, channel: str) -> tuple[AgentSettings, EndUser] | _Refusal:
    """Open a chat connection: the token not revoked, its agent's limits, the user's connection
    count (this one counted) and the end user (created on their first connection); or why not.

    One database-thread call instead of four hops from the event loop to a thread and back
    (docs/operations.md, "Web process CPU"), in the order they were made one by one. A failure after
    the connection was counted gives the count back: the consumer has not kept the claims to do so.
    """
    if chat_token_revoked(claims=claims):
        return _Refusal(CLOSE_UNAUTHORIZED, "token_revoked", "this chat token was revoked")
    try:
        limits = agent_settings(name=claims.agent)
    except NotFound:
        return _Refusal(
            CLOSE_UNAUTHORIZED, "unauthorized", f"the chat token's agent {claims.agent!r} does not exist"
        )
    limit = conf().RATE_LIMITS["WS_CONNECTIONS_PER_USER"]
    if not ws_connection_acquire(user_id=claims.external_id, channel=channel, limit=limit):
        return _Refusal(CLOSE_TOO_MANY, "too_many_connections", f"at most {limit} open connections per user")
    try:
        user = services.user_get_or_create(agent_id=limits.id, external_id=claims.external_id)
    except BaseException:
        with suppress(Exception):  # Redis may be what failed: the entry then goes stale on its own
            ws_connection_release(user_id=claims.external_id, channel=channel)
        raise
    return limits, user


def _accept(
    *,
    claims: ChatTokenClaims,
    held: HeldLimits,
    user_id: str,
    message: Any,
    client_message_id: Any,
    shown_by: str | None,
) -> Received | None:
    """Store a chat message (``message_accept_held``) and queue its turn when it has one to run (new,
    or a failed one sent again), with the limits the connection holds (checked against the agent's
    stored version by the message's one statement; read again into ``held`` when another process
    published a new version). None, storing nothing, when
    the user's chat tokens were revoked meanwhile (the user was erased: never re-create them).

    One database-thread call, and in a live session one statement (the read and the message's
    ``INSERT`` together, ``conversations.message_sql.message_store_live``; docs/operations.md, "Web
    process CPU"). The ``ack`` still reaches the socket before any event
    of the turn: the consumer handles the channel layer's events after this frame's handler ends.
    ``shown_by``: the sending socket's channel, left out of the ``user_message`` announcement (the
    consumer sends that frame itself, after the ``ack``).
    """
    if chat_token_revoked(claims=claims):
        return None
    received = message_accept_held(
        held=held, user_id=user_id, message=message, client_message_id=client_message_id, shown_by=shown_by
    )
    if received.run:  # with the agent, version and user: the worker need not read them again
        limits = held.limits
        queue_turn(
            received.message.pk, agent=limits.name, version=limits.version, user_pk=received.message.user_id
        )
    return received


class ChatConsumer(JsonFrameConsumer):
    FRAMES = {
        "message": "_on_message",
        "typing": "_on_typing",
        "ack": "_on_ack",
        "resume": "_on_resume",
        "ping": "_on_ping",
    }
    user: EndUser
    agent_name: str
    held: HeldLimits  # the agent's limits read at connect; replaced when a message finds a newer version
    group: str
    claims: ChatTokenClaims
    _typing: tuple[bool, float] = (False, 0.0)
    # Whether this socket sends its own messages' ``user_message`` frames itself, left out of the
    # announcement through the channel layer (a layer that can leave a member out: ``skips_members``).
    _shows_own: bool = False
    _counted_at: float = 0.0
    _metered: bool = False  # counted in agentflow_websocket_connections

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
        opened = await run_db(_open, claims=claims, channel=self.channel_name)
        if isinstance(opened, _Refusal):
            await self._refuse(opened.code, opened.error, opened.message)
            return
        limits, self.user = opened
        external_id = claims.external_id
        self.claims, self._counted_at = claims, time.monotonic()
        self.agent_name, self.held = limits.name, HeldLimits(limits)
        self.group = user_group(self.user.pk)
        self._shows_own = skips_members(self.channel_layer)
        await self.channel_layer.group_add(self.group, self.channel_name)
        await self.accept()
        self._metered = True
        metrics.WEBSOCKET_CONNECTIONS.labels(kind="chat").inc()
        logs.bind(agent=limits.name, user_id=external_id)  # this connection's log records
        await self._send(
            {
                "type": "ready",
                "protocol": PROTOCOL_VERSION,
                "user_id": external_id,
                "agent": limits.name,
                "server_time": timezone.now().isoformat(),
            }
        )

    async def _refuse(self, code: int, error: str, message: str) -> None:
        await self.accept()
        await self._error(error, message)
        await self.close(code=code)

    async def disconnect(self, code: int) -> None:
        if self._metered:
            self._metered = False
            metrics.WEBSOCKET_CONNECTIONS.labels(kind="chat").dec()
        # The connection count first: with the channel layer down (a 1013 close), group_discard fails.
        if getattr(self, "claims", None) is not None:
            await sync_to_async(ws_connection_release, thread_sensitive=False)(
                user_id=self.claims.external_id, channel=self.channel_name
            )
        if getattr(self, "group", None):
            await self.channel_layer.group_discard(self.group, self.channel_name)

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
        try:
            received = await run_db(
                _accept,
                claims=self.claims,
                held=self.held,
                user_id=self.user.external_id,
                message=frame.get("message"),  # the service checks it
                client_message_id=client_id,
                shown_by=self.channel_name if self._shows_own else None,
            )
        except InvalidInput as exc:
            await self._error(exc.code, str(exc), field=exc.field, client_message_id=client_id)
            return
        except RateLimited as exc:
            await self._error(exc.code, str(exc), retry_after=exc.retry_after, client_message_id=client_id)
            return
        if received is None:  # erased meanwhile (the close may still be on its way)
            await self._close_erased()
            return
        message = received.message
        await self._send(
            {
                "type": "ack",
                "message_id": str(message.pk),
                "client_message_id": client_id,
                "duplicate": not received.created,
            }
        )
        if received.created and self._shows_own:
            # As the announcement would have brought it, without the round trip through Redis (the
            # user's other connections and staff pages still get it from there).
            await self._send({"type": "user_message", **message_payload(message)})
        # A new message, or a resent failed one, was queued by _accept. A duplicate of one that is
        # done: the client may have missed the reply, so it is sent again.
        if not received.run and message.status == Message.Status.DONE:
            turn = await run_db(selectors.turn_result_for, message_id=message.pk)
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
            message = await run_db(services.user_mark_read, user=self.user, message_id=message_id)
        except NotFound as exc:
            await self._error("not_found", str(exc), field="message_id")
            return
        await apublish(user_pk=self.user.pk, event={"kind": "seen", "message_id": str(message.pk)})

    def history_owner(self) -> EndUser:
        return self.user

    async def chat_event(self, message: dict[str, Any]) -> None:
        """Live events for this user from the channel layer (a delta, a finished turn, staff...)."""
        for event in events_of(message):
            body = dict(event)
            kind = body.pop("kind", "event")
            if kind in STAFF_ONLY or (kind == "typing" and body.get("role") == "user"):
                continue  # the user's own typing and read position are for staff pages
            if kind == "turn":
                await self._send({"type": "turn", **body["turn"]})
            else:
                await self._send({"type": kind, **body})


CLOSE_FORBIDDEN = 4403
CLOSE_NOT_FOUND = 4404
ESCALATION_ACTIONS = {
    "claim": escalation_claim,
    "release": escalation_release,
    "hand_back": escalation_resolve,
}


class FrameError(Exception):
    """A staff frame was refused; becomes an ``error`` frame. Nothing was changed."""

    def __init__(self, code: str, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.code = code
        self.extra = extra


def _escalation_id(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise FrameError("bad_frame", "'escalation_id' must be an escalation's id", field="escalation_id")
    try:
        number = int(value)
    except ValueError:
        number = 0
    if not 0 < number < 2**63:  # not an id the database could hold
        raise FrameError("not_found", f"escalation {value!r} not found for this user")
    return number


def staff_act(*, kind: str, staff_pk: int, end_user: EndUser, frame: dict[str, Any]) -> dict[str, Any]:
    """Run one staff frame (``reply``, ``claim``, ``release``, ``hand_back``) through the services.

    The staff account is read again, so a deactivated account or a withdrawn permission stops
    acting at once, not at the next connection.

    Returns:
        The ``ack`` frame's fields.

    Raises:
        FrameError: the frame was refused; nothing changed.
    """
    staff_user = get_user_model().objects.filter(pk=staff_pk).first()
    if not may_act(staff_user):
        raise FrameError("forbidden", "you may not act on conversations (staff with escalation rights only)")
    if kind == "reply":
        thread_id, content = frame.get("thread_id"), frame.get("content")
        if not isinstance(thread_id, str):
            raise FrameError("bad_frame", "'thread_id' must be a string", field="thread_id")
        if not isinstance(content, str):
            raise FrameError("bad_frame", "'content' must be a string", field="content")
        try:
            thread = thread_get_for_user(user=end_user, thread_id=thread_id)
        except NotFound as exc:
            raise FrameError("not_found", str(exc), field="thread_id") from None
        try:
            message = staff_reply(thread=thread, staff_user=staff_user, content=content)
        except InvalidInput as exc:
            raise FrameError("invalid_input", str(exc), field="content") from None
        except PermissionError as exc:
            raise FrameError("forbidden", str(exc), field="thread_id") from None
        return {"action": kind, "message_id": str(message.pk), "thread_id": str(thread.pk)}
    escalation_id = _escalation_id(frame.get("escalation_id"))
    escalation = Escalation.objects.filter(user=end_user, pk=escalation_id).first()
    if escalation is None:
        raise FrameError("not_found", f"escalation {escalation_id} not found for this user")
    try:
        ESCALATION_ACTIONS[kind](escalation=escalation, staff_user=staff_user)
    except InvalidInput as exc:  # the escalation is not in a state that allows it (claimed, resolved)
        raise FrameError("conflict", str(exc), escalation_id=escalation.pk) from None
    except PermissionError as exc:  # another staff member holds it
        raise FrameError("forbidden", str(exc), escalation_id=escalation.pk) from None
    return {"action": kind, "escalation_id": escalation.pk}


class StaffConsumer(JsonFrameConsumer):
    """``/ws/staff/users/<user_pk>/``: one end user's conversation, live, for staff (see the module)."""

    FRAMES = {
        "reply": "_on_reply",
        "claim": "_on_claim",
        "release": "_on_release",
        "hand_back": "_on_hand_back",
        "typing": "_on_typing",
        "resume": "_on_resume",
        "ping": "_on_ping",
    }
    end_user: EndUser
    staff_user: Any
    staff_pk: int
    _may_act: bool = False
    _joined: tuple[str, ...] = ()
    _metered: bool = False

    async def connect(self) -> None:
        staff_user = self.scope.get("user")
        if not await run_db(may_watch, staff_user):
            # Accept first: a close before accepting reaches browsers as a bare HTTP 403 with no code.
            await self._refuse("forbidden", "staff only: log in to the admin", CLOSE_FORBIDDEN)
            return
        end_user = await EndUser.objects.filter(pk=self.scope["url_route"]["kwargs"]["user_pk"]).afirst()
        if end_user is None:
            await self._refuse("not_found", "no such end user", CLOSE_NOT_FOUND)
            return
        self.end_user, self.staff_user, self.staff_pk = end_user, staff_user, staff_user.pk
        self._may_act = await run_db(may_act, staff_user)
        self._joined = (user_group(end_user.pk), staff_group(end_user.pk))
        for group in self._joined:
            await self.channel_layer.group_add(group, self.channel_name)
        await self.accept()
        self._metered = True
        metrics.WEBSOCKET_CONNECTIONS.labels(kind="staff").inc()
        await self._send(
            {
                "type": "ready",
                "protocol": 1,
                "user_id": end_user.external_id,
                "user_pk": end_user.pk,
                "may_act": self._may_act,
            }
        )
        await self._send_escalations()

    async def disconnect(self, code: int) -> None:
        if self._metered:
            self._metered = False
            metrics.WEBSOCKET_CONNECTIONS.labels(kind="staff").dec()
        for group in self._joined:
            await self.channel_layer.group_discard(group, self.channel_name)

    async def _refuse(self, code: str, message: str, close_code: int) -> None:
        await self.accept()
        await self._error(code, message)
        await self.close(code=close_code)

    async def _send_escalations(self) -> None:
        rows = await run_db(escalations_for_staff, user_pk=self.end_user.pk, staff_user=self.staff_user)
        await self._send({"type": "escalations", "escalations": rows})

    async def _on_ping(self, frame: dict[str, Any]) -> None:
        await self._send({"type": "pong"})

    async def _on_typing(self, frame: dict[str, Any]) -> None:
        state = frame.get("state")
        if not isinstance(state, bool):
            await self._error("bad_frame", "'state' must be true or false", field="state")
            return
        if not self._may_act:
            await self._error(
                "forbidden", "you may not act on conversations (staff with escalation rights only)"
            )
            return
        await apublish(
            user_pk=self.end_user.pk, event={"kind": "typing", "role": "human_agent", "state": state}
        )

    def history_owner(self) -> EndUser:
        return self.end_user

    async def _on_action(self, kind: str, frame: dict[str, Any]) -> None:
        client = self.scope.get("client") or [None]
        try:
            with audit_scope(ip=client[0], route=f"WS {self.scope.get('path', '')} {kind}"):
                done = await run_db(
                    staff_act, kind=kind, staff_pk=self.staff_pk, end_user=self.end_user, frame=frame
                )
        except FrameError as exc:
            await self._error(exc.code, str(exc), action=kind, **exc.extra)
            return
        await self._send({"type": "ack", **done})
        if kind in ESCALATION_ACTIONS:  # every staff page watching this user redraws its escalations
            await self.channel_layer.group_send(staff_group(self.end_user.pk), {"type": "staff.changed"})

    # The four staff actions share one handler (checks, the service call, the acknowledgement).
    _on_reply = partialmethod(_on_action, "reply")
    _on_claim = partialmethod(_on_action, "claim")
    _on_release = partialmethod(_on_action, "release")
    _on_hand_back = partialmethod(_on_action, "hand_back")

    async def chat_event(self, message: dict[str, Any]) -> None:
        """Events of the end user's conversation: each forwarded as a frame whose ``type`` is its kind."""
        for event in events_of(message):
            body = dict(event)
            kind = body.pop("kind", "event")
            if kind == "turn" and isinstance(body.get("turn"), dict):
                turn = body["turn"]
                await self._send({"type": "turn", **turn})
                if turn.get("escalated"):  # the turn may have opened an escalation
                    await self._send_escalations()
                continue
            await self._send({"type": kind, **body})
            if kind in ("human_joined", "bot_back"):  # claimed or handed back, here or in the admin queue
                await self._send_escalations()

    async def staff_changed(self, event: dict[str, Any]) -> None:
        await self._send_escalations()

    async def chat_erased(self, event: dict[str, Any]) -> None:
        """The end user was erased: nothing is left to watch; close as for an unknown user."""
        if not self._closing:
            self._closing = True
            await self._error("not_found", "this end user was erased")
            await self.close(code=CLOSE_NOT_FOUND)


class StaffQueueConsumer(JsonFrameConsumer):
    """``/ws/staff/queue/``: the hand-off inbox's live feed, for staff who may watch conversations.

    Sends ``escalation_opened`` with the new escalation's inbox row when a turn hands a thread to a
    human, and ``escalation_changed`` (``escalation_id``, ``status``, the row or null once resolved)
    when one is claimed, released or handed back. The page that gets them decides how to alert.
    """

    FRAMES = {"ping": "_on_ping"}
    staff_user: Any
    _joined: bool = False

    async def connect(self) -> None:
        staff_user = self.scope.get("user")
        if not await run_db(may_watch, staff_user):
            await self.accept()
            await self._error("forbidden", "staff only: log in to the admin")
            await self.close(code=CLOSE_FORBIDDEN)
            return
        self.staff_user = staff_user
        await self.channel_layer.group_add(STAFF_QUEUE_GROUP, self.channel_name)
        self._joined = True
        await self.accept()
        await self._send({"type": "ready", "protocol": 1})

    async def disconnect(self, code: int) -> None:
        if self._joined:
            await self.channel_layer.group_discard(STAFF_QUEUE_GROUP, self.channel_name)

    async def _on_ping(self, frame: dict[str, Any]) -> None:
        await self._send({"type": "pong"})

    async def staff_queue(self, event: dict[str, Any]) -> None:
        body = event["event"]
        row = await run_db(inbox_row_by_id, escalation_id=body["escalation_id"], staff_user=self.staff_user)
        payload = row_payload(row) if row is not None else None
        if body["kind"] == "escalation_opened" and payload is None:
            return  # resolved already: nothing to alert about
        await self._send(
            {
                "type": body["kind"],
                "escalation_id": body["escalation_id"],
                "status": body.get("status", "open"),
                "escalation": payload,
            }
        )
