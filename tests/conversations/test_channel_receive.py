"""The channel layer's receive side: one process's sockets share one Redis receive, and a socket that
goes away must not take another socket's message with it (agentflow.channel_layer)."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from typing import Any

import pytest
import redis
from django.conf import settings as django_settings

from agentflow.channel_layer import RedisChannelLayer


def _layer(prefix: str) -> RedisChannelLayer:
    return RedisChannelLayer(hosts=[django_settings.REDIS_URL], prefix=prefix)


def _send_from_another_process(prefix: str, channel: str, message: dict[str, Any]) -> None:
    """Send as the worker would, from its own layer and loop, while this loop stands still: when it
    returns, Redis has already handed the message to this process's blocking pop."""

    async def send() -> None:
        sender = _layer(prefix)
        await sender.send(channel, message)
        await sender.close_pools()

    thread = threading.Thread(target=asyncio.run, args=(send(),))
    thread.start()
    thread.join()
    time.sleep(0.2)  # the pop's reply is on this process's socket, not yet read


async def test_a_socket_leaving_while_the_shared_receive_pops_does_not_lose_anothers_message() -> None:
    """channels-redis lets the receiving socket's own task run the process's shared blocking pop; when
    that socket disconnects (its receive cancelled) just as the pop returns a message for another
    socket, the message was gone: popped from Redis, never put back (django/channels_redis#366)."""
    prefix = f"{django_settings.CHANNEL_LAYERS['default']['CONFIG']['prefix']}-{uuid.uuid4().hex[:6]}"
    layer = _layer(prefix)
    leaving, staying = await layer.new_channel(), await layer.new_channel()
    leaving_receive = asyncio.ensure_future(layer.receive(leaving))
    await asyncio.sleep(0.3)  # its receive now runs the shared pop, waiting in Redis

    _send_from_another_process(prefix, staying, {"type": "chat.event", "event": {"kind": "turn"}})
    leaving_receive.cancel()  # that socket disconnects
    with pytest.raises(asyncio.CancelledError):
        await leaving_receive

    assert await asyncio.wait_for(layer.receive(staying), 5) == {
        "type": "chat.event",
        "event": {"kind": "turn"},
    }
    await layer.flush()
    await layer.close_pools()


async def test_every_socket_gets_its_own_messages_while_others_come_and_go() -> None:
    prefix = f"{django_settings.CHANNEL_LAYERS['default']['CONFIG']['prefix']}-{uuid.uuid4().hex[:6]}"
    layer, sender = _layer(prefix), _layer(prefix)
    channels = [await layer.new_channel() for _ in range(6)]
    staying, leaving = channels[:3], channels[3:]
    receives = {c: asyncio.ensure_future(layer.receive(c)) for c in channels}
    await asyncio.sleep(0.2)
    for n, channel in enumerate(staying):
        await sender.send(channel, {"type": "chat.event", "n": n})
    for channel in leaving:
        receives[channel].cancel()

    got = await asyncio.wait_for(asyncio.gather(*(receives[c] for c in staying)), 5)
    assert got == [{"type": "chat.event", "n": n} for n in range(3)]
    for channel in leaving:
        assert receives[channel].cancelled()
    await layer.flush()
    await layer.close_pools()
    await sender.close_pools()


async def test_messages_for_one_socket_arrive_in_the_order_sent() -> None:
    prefix = f"{django_settings.CHANNEL_LAYERS['default']['CONFIG']['prefix']}-{uuid.uuid4().hex[:6]}"
    layer, sender = _layer(prefix), _layer(prefix)
    channel = await layer.new_channel()
    waiting = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(0.1)
    for n in range(5):
        await sender.send(channel, {"type": "chat.event", "n": n})
    got = [await asyncio.wait_for(waiting, 5)] + [
        await asyncio.wait_for(layer.receive(channel), 5) for _ in range(4)
    ]
    assert [m["n"] for m in got] == [0, 1, 2, 3, 4]
    await layer.flush()
    await layer.close_pools()
    await sender.close_pools()


async def test_a_receive_waits_past_the_blocking_timeout_and_a_failure_reaches_the_waiting_socket() -> None:
    prefix = f"{django_settings.CHANNEL_LAYERS['default']['CONFIG']['prefix']}-{uuid.uuid4().hex[:6]}"
    layer = RedisChannelLayer(hosts=[django_settings.REDIS_URL], prefix=prefix, capacity=10)
    layer.brpop_timeout = 1
    channel = await layer.new_channel()
    waiting = asyncio.ensure_future(layer.receive(channel))
    await asyncio.sleep(2.5)  # two empty-handed pops: the socket keeps waiting
    assert not waiting.done()
    sender = _layer(prefix)
    await sender.send(channel, {"type": "chat.event", "late": True})
    await sender.close_pools()
    assert await asyncio.wait_for(waiting, 5) == {"type": "chat.event", "late": True}

    broken = RedisChannelLayer(hosts=["redis://127.0.0.1:1"], prefix=prefix)  # nothing listens there
    with pytest.raises(redis.exceptions.ConnectionError):
        await asyncio.wait_for(broken.receive(await broken.new_channel()), 10)
    await layer.flush()
    await layer.close_pools()


async def test_a_pop_left_running_for_sockets_does_not_hold_up_another_channel_of_the_process() -> None:
    """The readiness probe receives on ``health.<client>!``, a process channel of its own: the sockets'
    pop (``specific.<client>!``), still running after the last socket left, must not keep it waiting
    (it did, for up to the 5 s blocking timeout: the probe's 2 s ran out)."""
    prefix = f"{django_settings.CHANNEL_LAYERS['default']['CONFIG']['prefix']}-{uuid.uuid4().hex[:6]}"
    layer = _layer(prefix)
    socket = asyncio.ensure_future(layer.receive(await layer.new_channel()))
    await asyncio.sleep(0.2)
    socket.cancel()  # the socket leaves; its process channel's pop goes on
    health = await layer.new_channel("health")
    await layer.send(health, {"type": "health.ping"})
    assert await asyncio.wait_for(layer.receive(health), 1) == {"type": "health.ping"}
    await layer.flush()
    await layer.close_pools()
