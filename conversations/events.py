"""Live events to a user's connected chat clients, over the Channels layer (Redis).

Every process can publish (Celery workers during and after a turn, the admin when staff reply,
the chat consumer when a message is stored); every WebSocket connection of a user, and every staff
page watching that user, listens on that user's group. docs/protocol.md lists the event kinds:
each becomes a frame whose ``type`` is the kind.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

if TYPE_CHECKING:
    from .models import Message

logger = logging.getLogger("agentflow.events")

# Kinds only staff pages are shown: the user's own typing and read position.
STAFF_ONLY = frozenset({"seen"})


def user_group(user_pk: int) -> str:
    return f"chat.user.{user_pk}"


def message_payload(message: Message) -> dict[str, Any]:
    """A stored message as the protocol's message object (plain types: it crosses the channel layer)."""
    return {
        "id": str(message.pk),
        "thread_id": str(message.thread_id) if message.thread_id else None,
        "role": message.role,
        "content": message.content,
        "status": message.status,
        "client_message_id": message.client_message_id or None,
        "reply_to": str(message.reply_to_id) if message.reply_to_id else None,
        "intent": message.intent or None,
        "thread_event": message.thread_event or None,
        "escalated": message.escalated,
        "created_at": message.created_at.isoformat(),
    }


def skips_members(layer: Any) -> bool:
    """Whether ``layer``'s group sends take ``skip`` (a member left out: ``agentflow.channel_layer``)."""
    return bool(getattr(layer, "skips_members", False))


async def _group_send(
    layer: Any, group: str, message: dict[str, Any], *, blocking: bool, skip: str | None = None
) -> Any:
    """``layer.group_send``; with ``blocking``, through the layer's blocking client where it has one
    (``agentflow.channel_layer``), which holds up the running event loop for the send's round trips.
    ``skip``: a member channel left out, where the layer can (``skips_members``).

    ``blocking`` is for a loop that serves one caller's own work: a Celery worker thread's turn
    (``conversations.tasks``), whose loop waits on nothing else meanwhile. There the asyncio client
    cost each send the loop's wake-ups and a connection pool per worker thread; the blocking client
    is one pool per process, shared by its threads. Never on a shared loop (a web process's sockets).
    """
    skipping = {"skip": skip} if skip is not None and skips_members(layer) else {}
    if blocking:
        send = getattr(layer, "group_send_blocking", None)
        if send is not None:
            try:
                return send(group, message, **skipping)
            except NotImplementedError:  # a host the blocking client cannot reach (Sentinel)
                pass
    return await layer.group_send(group, message, **skipping)


async def apublish(
    *, user_pk: int, event: dict[str, Any], blocking: bool = False, skip: str | None = None
) -> None:
    """Send ``event`` (it needs a ``kind``) to every live connection of the user (``blocking``,
    ``skip``: see ``_group_send``)."""
    layer = get_channel_layer()
    if layer is None:
        return
    await _group_send(
        layer, user_group(user_pk), {"type": "chat.event", "event": event}, blocking=blocking, skip=skip
    )


async def apublish_listened(*, user_pk: int, event: dict[str, Any], blocking: bool = False) -> bool:
    """``apublish``, telling whether any connection listens on the user's group (as
    ``listeners_exist``): the send reads the group's members anyway, so a turn's first event (typing)
    answers the question without a round trip of its own. True whenever that cannot be told (a
    channel layer that does not say, Redis trouble: the error is logged, the turn goes on)."""
    layer = get_channel_layer()
    if layer is None:
        return False
    try:
        members = await _group_send(
            layer, user_group(user_pk), {"type": "chat.event", "event": event}, blocking=blocking
        )
    except Exception:  # the channel layer is down: the turn runs anyway, clients re-read on reconnect
        logger.warning("could not publish %s to user %s", event.get("kind"), user_pk, exc_info=True)
        return True
    return members > 0 if isinstance(members, int) else True


async def apublish_many(
    *, user_pk: int, events: list[dict[str, Any]], main: int = 0, blocking: bool = False
) -> None:
    """Send ``events`` to every live connection of the user as one channel-layer message.

    Each connection turns them into frames, in order (``events_of``): one ``group_send`` and one
    delivery per connection instead of one per event (a turn's end is three events: the thread
    change, the reply, typing off). ``events[main]`` also travels as the message's ``event``, so a
    consumer that predates ``events`` (a web process not yet upgraded) still sends that one.
    ``blocking``: see ``_group_send``.
    """
    layer = get_channel_layer()
    if layer is None or not events:
        return
    message = {"type": "chat.event", "event": events[main], "events": events}
    await _group_send(layer, user_group(user_pk), message, blocking=blocking)


def events_of(message: dict[str, Any]) -> list[dict[str, Any]]:
    """The events a ``chat.event`` message carries (``apublish`` sends one, ``apublish_many`` a list)."""
    events = message.get("events")
    return list(events) if isinstance(events, list) else [message["event"]]


async def listeners_exist(*, user_pk: int) -> bool:
    """Whether any connection listens on the user's group (a chat socket, a staff page).

    One ``ZCARD`` on the group's sorted set in channels-redis (what ``group_send`` reads first);
    True whenever that cannot be told (another channel layer, Redis trouble): then events are sent.
    """
    layer = get_channel_layer()
    if layer is None:
        return False
    try:
        group = user_group(user_pk)
        connection = layer.connection(layer.consistent_hash(group))
        return bool(await connection.zcard(layer._group_key(group)))
    except Exception:  # not channels-redis, or Redis failing: send, as before
        return True


def publish(*, user_pk: int, event: dict[str, Any], skip: str | None = None) -> None:
    """``apublish`` from synchronous code, through the event loop (``skip``: see ``publish_from_thread``)."""
    try:
        async_to_sync(apublish)(user_pk=user_pk, event=event, skip=skip)
    except Exception:  # a lost live notification must not fail the turn: clients re-read on reconnect
        logger.exception("could not publish %s to user %s", event.get("kind"), user_pk)


def publish_from_thread(*, user_pk: int, event: dict[str, Any], skip: str | None = None) -> None:
    """``publish`` for synchronous code (a request's thread, a database step): through the channel
    layer's blocking ``group_send`` where it has one (``agentflow.channel_layer``), else as ``publish``.

    The web process stores every incoming message on a thread and announces it from there: with
    ``publish`` that was a switch to the event loop and back for each message (and, for a REST
    caller with no socket open, for a send that only finds the group empty).

    ``skip``: a channel of the user's group left out, on a layer that can (``skips_members``): the
    chat socket that sent a message shows its ``user_message`` itself (``ChatConsumer``), instead of
    a delivery through Redis back to its own process.
    """
    layer = get_channel_layer()
    send = getattr(layer, "group_send_blocking", None)
    if send is None:
        publish(user_pk=user_pk, event=event, skip=skip)
        return
    skipping = {"skip": skip} if skip is not None and skips_members(layer) else {}
    try:
        send(user_group(user_pk), {"type": "chat.event", "event": event}, **skipping)
    except NotImplementedError:  # a host the blocking client cannot reach (Sentinel)
        publish(user_pk=user_pk, event=event, skip=skip)
    except Exception:  # a lost live notification must not fail the caller: clients re-read on reconnect
        logger.exception("could not publish %s to user %s", event.get("kind"), user_pk)


def publish_on_commit(*, user_pk: int, event: dict[str, Any], skip: str | None = None) -> None:
    """Publish once the surrounding transaction commits (at once outside one), from this thread
    (``skip``: see ``publish_from_thread``)."""
    from django.db import transaction

    transaction.on_commit(lambda: publish_from_thread(user_pk=user_pk, event=event, skip=skip))


STAFF_QUEUE_GROUP = "staff.queue"


def staff_queue_publish_on_commit(*, event: dict[str, Any]) -> None:
    """Tell every open staff inbox about an escalation (``kind``: ``escalation_opened`` or
    ``escalation_changed``, with ``escalation_id``), once the surrounding transaction commits."""
    from django.db import transaction

    def send() -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        try:
            async_to_sync(layer.group_send)(STAFF_QUEUE_GROUP, {"type": "staff.queue", "event": event})
        except Exception:  # a lost alert must not fail the turn: the inbox lists it on its next load
            logger.exception("could not publish %s to the staff inbox", event.get("kind"))

    transaction.on_commit(send)


def user_erased_on_commit(*, user_pk: int) -> None:
    """Once the erase commits, tell every connection of the user (and staff watching) to close."""
    from django.db import transaction

    def send() -> None:
        layer = get_channel_layer()
        if layer is None:
            return
        try:
            async_to_sync(layer.group_send)(user_group(user_pk), {"type": "chat.erased"})
        except Exception:  # the sockets still cannot act: their tokens are revoked
            logger.exception("could not close the sockets of erased user %s", user_pk)

    transaction.on_commit(send)


# The gathering window grows with the reply: a twentieth of the time it has streamed, from the configured
# interval up to STREAM_WINDOW_CAP times it. Each send costs the worker ~0.45 ms of CPU under load (and a
# frame in every web process with a listener); a real model streams for seconds, so a fixed 50 ms window
# made a 6 s reply ~120 sends, more CPU than the rest of its turn; growing, it is ~58, and the text still
# moves at least five times a second (docs/operations.md, "Worker process CPU").
STREAM_WINDOW_GROWTH = 1 / 20
STREAM_WINDOW_CAP = 4


def gather_window(interval: float, age: float) -> float:
    """Seconds to gather pieces for, ``age`` seconds into a reply streamed at ``interval`` (0: none)."""
    if interval <= 0:
        return 0.0
    return min(max(interval, age * STREAM_WINDOW_GROWTH), interval * STREAM_WINDOW_CAP)


class DeltaStream:
    """Streams a reply's text to the user's connections as ``delta`` events, batched.

    The first piece goes out at once (time to first token); later pieces are gathered for up to
    ``interval`` seconds (``AGENTFLOW["STREAM_INTERVAL_MS"]``), a window that grows as the reply goes
    on (``gather_window``: up to 4 times it), so a fast or long-winded model does not cost one
    channel-layer send per token: each send is a ``group_send`` in the worker, a delivery through
    Redis and a frame in every web process with a listener. ``interval=0`` sends every piece.
    Use as ``on_text`` of ``Agent.respond``, then ``await stream.close()`` to send what is left.

    A reply nobody watches live (a REST caller, a user with no socket open) is not streamed: whether
    anyone listens is asked once, at the first piece (``listeners_exist``), unless the caller asked
    already (``listened``). A socket that opens
    later in the reply gets the whole text with the ``turn`` event, as one that reconnects does.
    ``blocking``: each send through the channel layer's blocking client (``_group_send``: a Celery
    worker thread's turn).
    """

    def __init__(
        self,
        *,
        user_pk: int,
        message_id: str,
        interval: float = 0.05,
        listened: bool | None = None,
        blocking: bool = False,
    ) -> None:
        self.user_pk, self.message_id, self.interval = user_pk, message_id, interval
        self.blocking = blocking
        self.seq = 0
        self._listened = listened  # None: ask at the first piece
        self._buffer: list[str] = []
        self._last_sent = 0.0
        self._started: float | None = None  # the loop's time at the first piece
        self._timer: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def __call__(self, text: str) -> None:
        if not text:
            return
        if self._listened is None:
            self._listened = await listeners_exist(user_pk=self.user_pk)
        if not self._listened:
            return
        self._buffer.append(text)
        now = asyncio.get_running_loop().time()
        if self._started is None:
            self._started = now
        wait = self._last_sent + gather_window(self.interval, now - self._started) - now
        if wait <= 0:
            await self._flush()
        elif self._timer is None:
            self._timer = asyncio.ensure_future(self._flush_later(wait))

    async def _flush_later(self, wait: float) -> None:
        await asyncio.sleep(wait)
        self._timer = None
        await self._flush()

    def _gathered(self) -> dict[str, Any] | None:
        """The text gathered so far as the next ``delta`` event (None when there is none)."""
        if not self._buffer:
            return None
        text, self._buffer = "".join(self._buffer), []
        seq, self.seq = self.seq, self.seq + 1
        return {"kind": "delta", "message_id": self.message_id, "seq": seq, "text": text}

    async def _flush(self) -> None:
        async with self._lock:
            event = self._gathered()
            if event is None:
                return
            self._last_sent = asyncio.get_running_loop().time()
            try:
                await apublish(user_pk=self.user_pk, event=event, blocking=self.blocking)
            except Exception:  # the final turn carries the whole text; a lost delta only costs smoothness
                logger.exception("could not stream a delta to user %s", self.user_pk)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def close(self) -> None:
        """Send what is still gathered; call when the reply is complete."""
        self._stop_timer()
        await self._flush()

    def take(self) -> dict[str, Any] | None:
        """End the stream without sending what is still gathered: its ``delta`` event (None when
        nothing is), for the caller to send first among its own events in one channel-layer message
        (``apublish_many``: a Celery turn's end). The connections get the same frames, in the same
        order, as after ``close`` and a send of those events."""
        self._stop_timer()
        return self._gathered()
