"""Live events on their way to sockets: several events in one channel-layer message, the channel layer's
two-round-trip ``group_send`` (agentflow.channel_layer), and streamed text gathered per interval."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from channels.layers import get_channel_layer
from channels.testing import WebsocketCommunicator
from django.conf import settings as django_settings

from agentflow import channel_layer
from agentflow.channel_layer import RedisChannelLayer
from agentflow.conf import conf
from agentflow.errors import ConfigError
from conversations.events import (
    DeltaStream,
    apublish,
    apublish_listened,
    apublish_many,
    events_of,
    gather_window,
    user_group,
)
from conversations.models import EndUser

from .helpers import chat_socket

pytestmark = pytest.mark.django_db(transaction=True)


async def _connect(user_id: str) -> tuple[WebsocketCommunicator, int]:
    communicator = await chat_socket(user_id)
    user = await EndUser.objects.aget(external_id=user_id)
    return communicator, user.pk


async def _frames(communicator: WebsocketCommunicator, count: int) -> list[dict[str, Any]]:
    return [await communicator.receive_json_from(timeout=10) for _ in range(count)]


# --- several events in one message -----------------------------------------------------------------


async def test_events_sent_together_reach_the_socket_as_frames_in_their_order() -> None:
    communicator, user_pk = await _connect("bundle-alice")
    try:
        turn = {"message_id": "m-1", "status": "done", "content": "Shipped."}
        await apublish_many(
            user_pk=user_pk,
            events=[
                {"kind": "thread", "event": "NEW_TOPIC", "thread_id": "t-1"},
                {"kind": "seen", "message_id": "m-0"},  # for staff pages only: not sent to the user
                {"kind": "turn", "turn": turn},
                {"kind": "typing", "role": "assistant", "state": False, "message_id": "m-1"},
            ],
            main=2,
        )

        frames = await _frames(communicator, 3)
        assert await communicator.receive_nothing(timeout=0.3)
    finally:
        await communicator.disconnect()

    assert frames == [
        {"type": "thread", "event": "NEW_TOPIC", "thread_id": "t-1"},
        {"type": "turn", **turn},
        {"type": "typing", "role": "assistant", "state": False, "message_id": "m-1"},
    ]


async def test_a_consumer_that_reads_only_the_main_event_gets_the_turn() -> None:
    """A web process not yet upgraded reads ``event`` alone: that is the turn, not the thread change."""
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(user_group(9_100_001), channel)
    try:
        await apublish_many(
            user_pk=9_100_001,
            events=[{"kind": "thread", "event": "RETURN"}, {"kind": "turn", "turn": {"message_id": "m-2"}}],
            main=1,
        )
        message = await asyncio.wait_for(layer.receive(channel), 5)
    finally:
        await layer.group_discard(user_group(9_100_001), channel)

    assert message["event"] == {"kind": "turn", "turn": {"message_id": "m-2"}}
    assert [e["kind"] for e in events_of(message)] == ["thread", "turn"]


async def test_a_single_event_message_is_still_one_frame() -> None:
    communicator, user_pk = await _connect("bundle-bob")
    try:
        await apublish(user_pk=user_pk, event={"kind": "typing", "role": "human_agent", "state": True})

        frames = await _frames(communicator, 1)
        assert await communicator.receive_nothing(timeout=0.3)
    finally:
        await communicator.disconnect()

    assert frames == [{"type": "typing", "role": "human_agent", "state": True}]


async def test_no_events_send_nothing() -> None:
    communicator, user_pk = await _connect("bundle-carol")
    try:
        await apublish_many(user_pk=user_pk, events=[])

        assert await communicator.receive_nothing(timeout=0.3)
    finally:
        await communicator.disconnect()


# --- the channel layer's group_send ---------------------------------------------------------------


def _prefix() -> str:
    return f"{django_settings.CHANNEL_LAYERS['default']['CONFIG']['prefix']}-{uuid.uuid4().hex[:6]}"


def _layer(prefix: str | None = None, **config: Any) -> RedisChannelLayer:
    """A layer as one process has it (its own process-wide receive channel) under ``prefix``."""
    config.setdefault("hosts", [django_settings.REDIS_URL])
    return RedisChannelLayer(prefix=prefix or _prefix(), **config)


async def test_group_send_reaches_every_member_and_skips_those_that_left() -> None:
    layer = _layer()
    first, second, gone = [await layer.new_channel() for _ in range(3)]
    for channel in (first, second, gone):
        await layer.group_add("chat.user.1", channel)
    await layer.group_discard("chat.user.1", gone)

    await layer.group_send("chat.user.1", {"type": "chat.event", "event": {"kind": "delta", "text": "Hi"}})

    received = [await asyncio.wait_for(layer.receive(c), 5) for c in (first, second)]
    assert received == [{"type": "chat.event", "event": {"kind": "delta", "text": "Hi"}}] * 2
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(gone), 0.3)
    await layer.flush()


async def test_group_send_to_an_empty_group_writes_nothing() -> None:
    layer = _layer()
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    before = set(client.scan_iter(f"{layer.prefix}*"))

    await layer.group_send("chat.user.2", {"type": "chat.event", "event": {"kind": "delta"}})

    assert set(client.scan_iter(f"{layer.prefix}*")) == before == set()
    client.close()


async def test_group_send_drops_a_message_over_capacity_and_still_delivers_to_the_rest() -> None:
    """A process-wide receive channel holding ``capacity`` unread messages gets no more (as channels-redis)."""
    prefix = _prefix()
    full, other = _layer(prefix, capacity=2), _layer(prefix, capacity=2)  # two processes
    stuck = await full.new_channel()  # nobody reads it
    reader = await other.new_channel()
    await full.group_add("chat.user.3", stuck)
    await full.group_add("chat.user.3", reader)

    for n in range(3):
        await full.group_send("chat.user.3", {"type": "chat.event", "n": n})

    got = [(await asyncio.wait_for(other.receive(reader), 5))["n"] for _ in range(2)]
    assert got == [0, 1]  # the third is over the reader's capacity too: nobody read in between
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    assert client.zcard(full.prefix + full.non_local_name(stuck)) == 2
    client.close()
    await full.flush()
    await other.flush()


async def test_group_send_loads_its_script_when_the_server_does_not_know_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As after a Redis restart: ``EVALSHA`` answers NOSCRIPT, the script is sent whole."""
    layer = _layer()
    channel = await layer.new_channel()
    await layer.group_add("chat.user.4", channel)
    monkeypatch.setattr(channel_layer, "DELIVER_SHA", "0" * 40)  # a script no server has

    await layer.group_send("chat.user.4", {"type": "chat.event", "n": 1})

    assert (await asyncio.wait_for(layer.receive(channel), 5))["n"] == 1
    await layer.flush()


async def test_the_blocking_group_send_delivers_as_group_send_does() -> None:
    """From a thread (where the web process stores a message), with a blocking client."""
    layer = _layer()
    first, second, gone = [await layer.new_channel() for _ in range(3)]
    for channel in (first, second, gone):
        await layer.group_add("chat.user.5", channel)
    await layer.group_discard("chat.user.5", gone)
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    keys_before = set(client.scan_iter(f"{layer.prefix}*"))

    await asyncio.to_thread(layer.group_send_blocking, "chat.user.6", {"type": "chat.event", "n": 0})
    assert set(client.scan_iter(f"{layer.prefix}*")) == keys_before  # an empty group: nothing written
    await asyncio.to_thread(layer.group_send_blocking, "chat.user.5", {"type": "chat.event", "n": 1})

    received = [await asyncio.wait_for(layer.receive(c), 5) for c in (first, second)]
    assert received == [{"type": "chat.event", "n": 1}] * 2
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(layer.receive(gone), 0.3)
    client.close()
    await layer.flush()


async def test_the_blocking_group_send_keeps_the_capacity_and_loads_its_script(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    prefix = _prefix()
    layer, other = _layer(prefix, capacity=2), _layer(prefix, capacity=2)
    reader = await other.new_channel()
    await layer.group_add("chat.user.7", reader)
    monkeypatch.setattr(channel_layer, "DELIVER_SHA", "0" * 40)  # as after a Redis restart

    for n in range(3):
        await asyncio.to_thread(layer.group_send_blocking, "chat.user.7", {"type": "chat.event", "n": n})

    got = [(await asyncio.wait_for(other.receive(reader), 5))["n"] for _ in range(2)]
    assert got == [0, 1]
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(other.receive(reader), 0.3)
    await layer.flush()
    await other.flush()


async def test_a_message_stored_on_a_thread_is_announced_without_a_switch_to_the_event_loop(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from asgiref.sync import sync_to_async

    from conversations import events
    from conversations.agents import agent_settings, message_accept

    switched: list[str] = []
    original = events.async_to_sync

    def counting(func: Any, *args: Any, **kwargs: Any) -> Any:
        switched.append(getattr(func, "__name__", repr(func)))
        return original(func, *args, **kwargs)

    monkeypatch.setattr(events, "async_to_sync", counting)
    communicator, _ = await _connect("announce-alice")
    try:

        def store() -> Any:
            limits = agent_settings(name=conf().DEFAULT_AGENT)
            return message_accept(limits=limits, user_id="announce-alice", message="Where is my order?")

        received = await sync_to_async(store, thread_sensitive=False)()
        frame = await communicator.receive_json_from(timeout=5)

        assert (frame["type"], frame["id"], frame["content"]) == (
            "user_message",
            str(received.message.pk),
            "Where is my order?",
        )
        assert switched == []
    finally:
        await communicator.disconnect()


# --- the channel layer's receive --------------------------------------------------------------------


@pytest.fixture(scope="module")
def counted_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server of these tests' own (the embedded Valkey, on a free port): the command counts
    below are server-wide, and another test run or bench on a shared server adds to them."""
    from agentflow_project import runtime

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    patch = pytest.MonkeyPatch()
    patch.setenv("AGENTFLOW_DATA_DIR", str(tmp_path_factory.mktemp("counted-redis")))
    patch.setenv("AGENTFLOW_EMBEDDED_REDIS_PORT", str(port))
    try:
        yield runtime.ensure_valkey()
    finally:
        runtime.stop_valkey()
        patch.undo()


def _calls(client: redis.Redis, *commands: str) -> dict[str, int]:
    stats = client.info("commandstats")
    return {c: int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in commands}


RECEIVE_COMMANDS = ("bzmpop", "bzpopmin", "zadd", "zpopmin", "eval", "evalsha")
# The pump's blocking pop: BZMPOP (Redis 7+), or BZPOPMIN with a pipelined ZPOPMIN (older Redis, as a
# layer that was told "unknown command" for BZMPOP uses).
POPS = pytest.mark.parametrize("bzmpop", [True, False], ids=["bzmpop", "bzpopmin"])


def _pop_command(bzmpop: bool) -> str:
    return "bzmpop" if bzmpop else "bzpopmin"


@POPS
async def test_a_message_is_received_in_one_round_trip_and_leaves_no_backup(
    bzmpop: bool, counted_redis: str
) -> None:
    layer = _layer(hosts=[counted_redis])
    layer._bzmpop = bzmpop
    channel = await layer.new_channel()
    client = redis.Redis.from_url(counted_redis)
    before = _calls(client, *RECEIVE_COMMANDS)
    for n in range(4):
        await layer.send(channel, {"type": "chat.event", "n": n})  # a ZADD each
        assert (await asyncio.wait_for(layer.receive(channel), 5))["n"] == n

    after = _calls(client, *RECEIVE_COMMANDS)
    calls = {c: after[c] - before[c] for c in RECEIVE_COMMANDS}
    # One blocking pop per message (without BZMPOP, each with its ZPOPMIN of what else waits, nothing
    # here, in the same round trip); the pump may have one more in flight when the socket stops
    # waiting. The EVAL: the one-time restore of a backup left by channels-redis's own class.
    pops = calls.pop(_pop_command(bzmpop))
    assert pops in (4, 5)
    expected = {
        "bzmpop": 0,
        "bzpopmin": 0,
        "zadd": 4,
        "zpopmin": 0 if bzmpop else pops,
        "eval": 1,
        "evalsha": 0,
    }
    del expected[_pop_command(bzmpop)]
    assert calls == expected
    assert list(client.scan_iter(f"{layer.prefix}*")) == []  # no message, no backup set
    client.close()
    await layer.flush()


@POPS
async def test_messages_waiting_are_taken_in_one_round_trip_in_their_order(
    bzmpop: bool, counted_redis: str
) -> None:
    layer = _layer(hosts=[counted_redis])
    layer._bzmpop = bzmpop
    first, second = await layer.new_channel(), await layer.new_channel()
    for n in range(12):  # a web process behind on its sockets' events
        await layer.send(first if n % 3 else second, {"type": "chat.event", "n": n})
    client = redis.Redis.from_url(counted_redis)
    before = _calls(client, *RECEIVE_COMMANDS)
    command = _pop_command(bzmpop)

    got_first = [(await asyncio.wait_for(layer.receive(first), 5))["n"] for _ in range(8)]
    pops = _calls(client, command)[command] - before[command]
    got_second = [(await asyncio.wait_for(layer.receive(second), 5))["n"] for _ in range(4)]

    assert got_first == [1, 2, 4, 5, 7, 8, 10, 11]
    assert got_second == [0, 3, 6, 9]  # buffered by the same pop: no round trip of its own
    assert pops in (1, 2)  # the one that took all twelve; the pump may have its next one in flight
    assert list(client.scan_iter(f"{layer.prefix}*")) == []
    client.close()
    await layer.flush()


async def test_more_messages_waiting_than_one_round_trip_takes_all_arrive() -> None:
    layer = _layer(capacity=1000)
    channel = await layer.new_channel()
    total = channel_layer.RECEIVE_BATCH * 2 + 3
    for n in range(total):
        await layer.send(channel, {"type": "chat.event", "n": n})

    got = [(await asyncio.wait_for(layer.receive(channel), 5))["n"] for _ in range(total)]

    assert got == list(range(total))
    await layer.flush()


async def test_messages_for_several_sockets_of_one_process_reach_each_in_order() -> None:
    layer = _layer()
    first, second = await layer.new_channel(), await layer.new_channel()
    for n in range(6):
        await layer.send(first if n % 2 == 0 else second, {"type": "chat.event", "n": n})

    got_second = [(await asyncio.wait_for(layer.receive(second), 5))["n"] for _ in range(3)]
    got_first = [(await asyncio.wait_for(layer.receive(first), 5))["n"] for _ in range(3)]

    assert (got_first, got_second) == ([0, 2, 4], [1, 3, 5])
    await layer.flush()


async def test_a_cancelled_receive_loses_no_message_sent_after_it() -> None:
    layer = _layer()
    layer.brpop_timeout = 1
    channel = await layer.new_channel()
    waiting = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0.2)  # blocked in BZPOPMIN
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting

    await layer.send(channel, {"type": "chat.event", "n": 7})

    assert (await asyncio.wait_for(layer.receive(channel), 5))["n"] == 7
    await layer.flush()


async def test_a_backup_left_by_channels_redis_own_layer_is_received_first() -> None:
    """A process running channels-redis's class (a rolling upgrade) may leave its backup set behind."""
    layer = _layer()
    channel = "chat-named-channel"  # a named channel, which several processes may read
    key = layer.prefix + channel
    client = redis.Redis.from_url(django_settings.REDIS_URL)
    client.zadd(layer._backup_channel_name(key), {layer.serialize({"type": "chat.event", "n": "kept"}): 1.0})
    await layer.send(channel, {"type": "chat.event", "n": "new"})

    got = [(await asyncio.wait_for(layer.receive(channel), 5))["n"] for _ in range(2)]

    assert got == ["kept", "new"]
    assert list(client.scan_iter(f"{layer.prefix}*")) == []
    client.close()
    await layer.flush()


async def test_the_blocking_group_send_tells_how_many_channels_the_group_had() -> None:
    layer = _layer()
    first, second = [await layer.new_channel() for _ in range(2)]
    for channel in (first, second):
        await layer.group_add("chat.user.8", channel)

    assert await asyncio.to_thread(layer.group_send_blocking, "chat.user.9", {"type": "chat.event"}) == 0
    assert await asyncio.to_thread(layer.group_send_blocking, "chat.user.8", {"type": "chat.event"}) == 2
    await layer.flush()


async def _texts(layer: Any, channel: str) -> list[str]:
    """The ``event.text`` of every message waiting for ``channel``, in order (until 0.3 s of silence)."""
    texts = []
    with contextlib.suppress(TimeoutError):
        while True:
            texts.append((await asyncio.wait_for(layer.receive(channel), 0.3))["event"]["text"])
    return texts


async def test_blocking_sends_follow_the_group_as_members_come_and_go() -> None:
    """A blocking send expects the members the last one found (one round trip when they are the same):
    members that joined or left since, or whose membership expired, are found all the same."""
    layer = _layer()
    send = layer.group_send_blocking
    first, second, third = [await layer.new_channel() for _ in range(3)]
    await layer.group_add("chat.user.12", first)

    counts = [await asyncio.to_thread(send, "chat.user.12", {"type": "chat.event", "event": {"text": "a"}})]
    counts.append(
        await asyncio.to_thread(send, "chat.user.12", {"type": "chat.event", "event": {"text": "b"}})
    )
    await layer.group_add("chat.user.12", second)
    counts.append(
        await asyncio.to_thread(send, "chat.user.12", {"type": "chat.event", "event": {"text": "c"}})
    )
    await layer.group_discard("chat.user.12", first)
    await layer.group_add("chat.user.12", third)
    counts.append(
        await asyncio.to_thread(send, "chat.user.12", {"type": "chat.event", "event": {"text": "d"}})
    )
    # The second member's membership lapses (older than group_expiry): it is dropped, as by group_send.
    key = layer._group_key("chat.user.12")
    await layer.connection(0).zadd(key, {second: 1})
    counts.append(
        await asyncio.to_thread(send, "chat.user.12", {"type": "chat.event", "event": {"text": "e"}})
    )
    received = {
        name: await _texts(layer, channel) for name, channel in (("1", first), ("2", second), ("3", third))
    }
    await layer.flush()

    assert counts == [1, 1, 2, 2, 1]
    assert received == {"1": ["a", "b", "c"], "2": ["c", "d"], "3": ["d", "e"]}
    assert layer._expected["chat.user.12"] == [third.encode()]


async def test_a_blocking_send_leaves_out_the_skipped_channel_on_both_paths() -> None:
    """``skip`` (the socket that shows its own message) holds when the send reads the group and when it
    sends to the members the last send found (one round trip), and when it is the only member."""
    layer = _layer()
    sender, other = [await layer.new_channel() for _ in range(2)]
    await layer.group_add("chat.user.14", sender)

    def send(text: str) -> int:
        return layer.group_send_blocking(
            "chat.user.14", {"type": "chat.event", "event": {"text": text}}, skip=sender
        )

    counts = [await asyncio.to_thread(send, "alone"), await asyncio.to_thread(send, "alone again")]
    await layer.group_add("chat.user.14", other)
    counts += [await asyncio.to_thread(send, "read"), await asyncio.to_thread(send, "expected")]

    received = {"sender": await _texts(layer, sender), "other": await _texts(layer, other)}
    await layer.flush()

    assert counts == [1, 1, 2, 2]
    assert received == {"sender": [], "other": ["read", "expected"]}


async def test_a_blocking_send_to_an_empty_group_it_expected_empty_delivers_nothing() -> None:
    layer = _layer()
    send = layer.group_send_blocking

    counts = [await asyncio.to_thread(send, "chat.user.13", {"type": "chat.event"}) for _ in range(2)]

    assert counts == [0, 0] and layer._expected["chat.user.13"] == []
    await layer.flush()


def test_the_blocking_sends_remember_a_bounded_number_of_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel_layer, "EXPECTED_GROUPS", 3)
    layer = _layer()
    for n in range(5):
        layer.group_send_blocking(f"chat.user.{9_200_000 + n}", {"type": "chat.event"})

    assert list(layer._expected) == [f"chat.user.{9_200_000 + n}" for n in (2, 3, 4)]


def test_the_blocking_client_waits_for_redis_a_bounded_time() -> None:
    """Its callers (a turn, a request's thread) must not hang on an unreachable Redis."""
    layer = _layer()
    kwargs = layer._blocking(0).connection_pool.connection_kwargs

    assert kwargs["socket_timeout"] == channel_layer.BLOCKING_SEND_TIMEOUT
    assert kwargs["socket_connect_timeout"] == channel_layer.BLOCKING_SEND_TIMEOUT
    assert kwargs["retry"].get_retries() == channel_layer.BLOCKING_SEND_RETRIES


async def test_a_worker_threads_turn_sends_its_events_in_order_without_the_asyncio_client() -> None:
    """A Celery worker thread's turn publishes with ``blocking=True`` from its own event loop: the
    frames arrive in the turn's order, and that loop never opened the layer's asyncio connections."""
    communicator, user_pk = await _connect("blocking-carol")
    layer = get_channel_layer()

    async def turn() -> bool:
        typing = {"kind": "typing", "role": "assistant", "state": True, "message_id": "m-9"}
        listened = await apublish_listened(user_pk=user_pk, event=typing, blocking=True)
        stream = DeltaStream(user_pk=user_pk, message_id="m-9", interval=60, listened=listened, blocking=True)
        for piece in ("Your ", "parcel ", "left."):
            await stream(piece)
        await stream.close()
        await apublish_many(
            user_pk=user_pk,
            events=[
                {"kind": "turn", "turn": {"message_id": "m-9", "content": "Your parcel left."}},
                {"kind": "typing", "role": "assistant", "state": False, "message_id": "m-9"},
            ],
            blocking=True,
        )
        return listened

    def worker_thread() -> tuple[bool, bool]:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(turn()), loop in layer._layers
        finally:
            loop.close()

    try:
        listened, opened_asyncio_pool = await asyncio.to_thread(worker_thread)
        frames = await _frames(communicator, 5)
        assert await communicator.receive_nothing(timeout=0.3)
    finally:
        await communicator.disconnect()

    assert listened is True
    assert opened_asyncio_pool is False
    assert [f["type"] for f in frames] == ["typing", "delta", "delta", "turn", "typing"]
    assert [(f["seq"], f["text"]) for f in frames[1:3]] == [(0, "Your "), (1, "parcel left.")]
    assert frames[4]["state"] is False


async def test_a_blocking_send_to_a_user_nobody_watches_says_so() -> None:
    typing = {"kind": "typing", "role": "assistant", "state": True, "message_id": "m-10"}

    assert await apublish_listened(user_pk=9_100_010, event=typing, blocking=True) is False


# --- streamed text gathered per interval ----------------------------------------------------------


async def test_pieces_within_the_interval_go_out_as_one_delta() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(user_group(9_100_002), channel)
    try:
        stream = DeltaStream(user_pk=9_100_002, message_id="m-3", interval=60, listened=True)
        for piece in ("Your ", "order ", "ships ", "today."):
            await stream(piece)
        await stream.close()
        received = [await asyncio.wait_for(layer.receive(channel), 5) for _ in range(2)]
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(layer.receive(channel), 0.3)
    finally:
        await layer.group_discard(user_group(9_100_002), channel)

    # The first piece at once (time to first token), the rest gathered until the reply was complete.
    assert [(e["event"]["seq"], e["event"]["text"]) for e in received] == [
        (0, "Your "),
        (1, "order ships today."),
    ]


def test_the_gathering_window_grows_with_the_reply_up_to_four_times_the_interval() -> None:
    assert gather_window(0.05, 0.0) == 0.05  # the configured interval at first
    assert gather_window(0.05, 1.0) == 0.05
    assert gather_window(0.05, 2.0) == pytest.approx(0.1)  # a twentieth of the time streamed
    assert gather_window(0.05, 60.0) == pytest.approx(0.2)  # at most four times the interval
    assert gather_window(0, 60.0) == 0.0  # interval 0: every piece at once, however long


async def test_late_in_a_long_reply_pieces_wait_for_the_grown_window() -> None:
    """A minute into a reply streamed at 0.5 s, a piece 0.6 s after the last send (past the
    configured interval) waits for the grown window (2 s) and then arrives, with nothing lost."""
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(user_group(9_100_012), channel)
    try:
        stream = DeltaStream(user_pk=9_100_012, message_id="m-12", interval=0.5, listened=True)
        await stream("Your ")  # the first piece: at once
        first = await asyncio.wait_for(layer.receive(channel), 5)
        stream._started -= 60  # as if the reply had streamed for a minute: the window is 2 s
        await asyncio.sleep(0.6)
        await stream("order ships today.")
        with pytest.raises(TimeoutError):  # a fixed window would have sent it now
            await asyncio.wait_for(layer.receive(channel), 0.5)
        second = await asyncio.wait_for(layer.receive(channel), 5)
        await stream.close()
    finally:
        await layer.group_discard(user_group(9_100_012), channel)

    assert [(e["event"]["seq"], e["event"]["text"]) for e in (first, second)] == [
        (0, "Your "),
        (1, "order ships today."),
    ]


async def test_a_taken_stream_hands_back_what_it_gathered_unsent() -> None:
    """A Celery turn's end takes the reply's last piece to send it with the end's events: ``take``
    gives it as the next ``delta`` event, sends nothing, and stops the pending send."""
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(user_group(9_100_011), channel)
    try:
        stream = DeltaStream(user_pk=9_100_011, message_id="m-11", interval=0.05, listened=True)
        for piece in ("Your ", "order ", "ships."):
            await stream(piece)
        taken = stream.take()
        again = stream.take()
        received = [await asyncio.wait_for(layer.receive(channel), 5)]
        with pytest.raises(TimeoutError):  # the gathered text's timer (50 ms) no longer sends it
            await asyncio.wait_for(layer.receive(channel), 0.3)
    finally:
        await layer.group_discard(user_group(9_100_011), channel)

    assert [e["event"]["text"] for e in received] == ["Your "]  # the first piece went at once
    assert taken == {"kind": "delta", "message_id": "m-11", "seq": 1, "text": "order ships."}
    assert again is None


async def test_a_stream_told_nobody_listens_sends_nothing() -> None:
    layer = get_channel_layer()
    channel = await layer.new_channel()
    await layer.group_add(user_group(9_100_003), channel)
    try:
        stream = DeltaStream(user_pk=9_100_003, message_id="m-4", interval=0, listened=False)
        await stream("Hello")
        await stream.close()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(layer.receive(channel), 0.3)
    finally:
        await layer.group_discard(user_group(9_100_003), channel)


@pytest.mark.parametrize("value", [-1, 2001, "fast"])
def test_a_bad_stream_interval_is_refused_with_its_name(settings: Any, value: Any) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "STREAM_INTERVAL_MS": value}

    with pytest.raises(ConfigError, match="STREAM_INTERVAL_MS"):
        conf()


def test_the_stream_interval_is_read_from_the_settings(settings: Any) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "STREAM_INTERVAL_MS": 250}

    assert conf().STREAM_INTERVAL_MS == 250
