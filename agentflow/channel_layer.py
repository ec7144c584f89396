"""channels-redis's channel layer, with a ``group_send`` of two Redis round trips instead of four (one for
a blocking send to a group whose members did not change since the last), and
a process-wide ``receive`` of one round trip that a closing socket cannot cut short.

channels-redis 4.3 sends a group message as: ``ZREMRANGEBYSCORE`` (the group's stale members), then
``ZRANGE`` (the members), then a ``MULTI``/``EXEC`` pipeline expiring old messages of each member's
channel, then an ``EVAL`` of its delivery script; four round trips and nine commands for a group of
one web process. Here the first two go in one pipeline, and the expiry of old messages moves into
the delivery script, run by its SHA (``EVALSHA``): two round trips, seven commands; a group with no
member (a REST caller with no socket open) costs one round trip. Messages, keys, capacities and
expiry are those of channels-redis, so processes running either class share one Redis.

Every live event of a turn (typing, each streamed delta, the final reply) is a ``group_send`` from
the worker, so this is most of the worker's channel-layer traffic.

Each of those events then reaches the web process holding the socket. Every socket of one web
process reads one Redis key, the process's channel, with a blocking pop (``BZMPOP`` of up to
``RECEIVE_BATCH`` messages; before Redis 7, ``BZPOPMIN`` and a pipelined ``ZPOPMIN``), and the pop
hands what it gets to the socket it is for. channels-redis 4.3 differs in two ways:

- It runs that pop in the task of whichever socket's ``receive`` got there first. When that socket
  closes, channels cancels its ``receive``, and so the pop: if Redis had already popped a message for
  another socket, the reply is dropped with the connection and the message is gone
  (django/channels_redis#366; seen here as a WebSocket that never got its turn's final frame when
  other sockets closed at that moment; ``tests/conversations/test_channel_receive.py`` reproduces it).
  Here the pop runs in a pump, a task of the layer's own per process channel, which no socket's
  cancellation reaches: it pops while any socket waits, and a socket waits only for its own buffer
  (a message wakes the one socket it is for, not every waiting socket). With no socket left waiting,
  the pump stops after its current pop (the blocking timeout, ``brpop_timeout``, 5 s).
- It receives a message in four round trips: an ``EVAL`` putting back the channel's "backup" set, the
  ``BZPOPMIN``, a ``ZADD`` of the message to the backup set and, in a task of its own, a ``ZPOPMIN``
  removing it again; the backup was its guard against the cancellation above, which cannot happen
  here. One blocking pop per batch of messages (and per idle ``brpop_timeout``). A backup left by a process
  running channels-redis's own class (on a channel both read) is put back once, at this process's
  first receive on that channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
import time
from typing import Any

import redis
from channels_redis.core import RedisChannelLayer as CoreRedisChannelLayer
from redis.backoff import ExponentialWithJitterBackoff
from redis.driver_info import DriverInfo
from redis.exceptions import NoScriptError, ResponseError
from redis.retry import Retry

from agentflow import hoptrace

logger = logging.getLogger("channels_redis.core")

# KEYS: the member channels' message sets; ARGV: a message per key, a capacity per key, now, expiry.
# As channels-redis's own script, plus the expiry of old messages it sent in a separate pipeline.
DELIVER = """
local now = tonumber(ARGV[#ARGV - 1])
local expiry = tonumber(ARGV[#ARGV])
local over_capacity = 0
for i = 1, #KEYS do
    redis.call('ZREMRANGEBYSCORE', KEYS[i], 0, math.floor(now) - expiry)
    if redis.call('ZCARD', KEYS[i]) < tonumber(ARGV[i + #KEYS]) then
        redis.call('ZADD', KEYS[i], ARGV[#ARGV - 1], ARGV[i])
        redis.call('EXPIRE', KEYS[i], expiry)
    else
        over_capacity = over_capacity + 1
    end
end
return over_capacity
"""
DELIVER_SHA = hashlib.sha1(DELIVER.encode()).hexdigest()
# A group send in one round trip, when the group's members are those the caller expects (the members
# its last send to that group found). KEYS: the group's set, then the expected members' channel keys;
# ARGV: the oldest member score kept, the number of expected members, the members, then DELIVER's
# arguments (a message and a capacity per channel key, now, expiry). Drops the group's stale members
# and reads the rest, as the pipeline of ``group_send_blocking`` does; when they are exactly the
# expected ones (in ZRANGE's order), delivers as DELIVER does and returns {over capacity, members};
# otherwise delivers nothing and returns {-1, the members}, for the caller to deliver to those.
DELIVER_EXPECTED = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], 0, ARGV[1])
local members = redis.call('ZRANGE', KEYS[1], 0, -1)
local n = tonumber(ARGV[2])
if #members ~= n then
    return {-1, members}
end
for i = 1, n do
    if members[i] ~= ARGV[2 + i] then
        return {-1, members}
    end
end
local keys = #KEYS - 1
local base = 2 + n
local now = tonumber(ARGV[#ARGV - 1])
local expiry = tonumber(ARGV[#ARGV])
local over_capacity = 0
for i = 1, keys do
    local key = KEYS[i + 1]
    redis.call('ZREMRANGEBYSCORE', key, 0, math.floor(now) - expiry)
    if redis.call('ZCARD', key) < tonumber(ARGV[base + keys + i]) then
        redis.call('ZADD', key, ARGV[#ARGV - 1], ARGV[base + i])
        redis.call('EXPIRE', key, expiry)
    else
        over_capacity = over_capacity + 1
    end
end
return {over_capacity, n}
"""
DELIVER_EXPECTED_SHA = hashlib.sha1(DELIVER_EXPECTED.encode()).hexdigest()
# Groups whose members a blocking send remembers (per process; a forgotten group costs one round trip).
EXPECTED_GROUPS = 10_000
# Seconds a blocking send (``group_send_blocking``) waits for Redis to connect or answer.
BLOCKING_SEND_TIMEOUT = 5.0
BLOCKING_SEND_RETRIES = 1
# Messages a process channel's pump takes in one round trip, at most (a web process behind on its
# sockets' events catches up).
RECEIVE_BATCH = 100


# channels-redis's own script: the backup set's messages back at the front of the channel.
RESTORE_BACKUP = """
local backed_up = redis.call('ZRANGE', ARGV[2], 0, -1, 'WITHSCORES')
for i = #backed_up, 1, -2 do
    redis.call('ZADD', ARGV[1], backed_up[i], backed_up[i - 1])
end
redis.call('DEL', ARGV[2])
"""


def _trace_turn_end(message: dict[str, Any]) -> None:
    """``AGENTFLOW_HOP_TRACE``: the web process popped a turn's final event (``w_relay``)."""
    for event in message.get("events") or [message.get("event")]:
        if isinstance(event, dict) and event.get("kind") == "turn":
            hoptrace.mark((event.get("turn") or {}).get("message_id"), "w_relay")


class _Pump:
    """One process channel's pop loop on one event loop, and the sockets waiting on it: each its
    channel and a future the pump completes when it has buffered a message for that socket (or
    fails, with the pop's error)."""

    def __init__(self) -> None:
        self.waiting: dict[str, asyncio.Future[None]] = {}
        self.task: asyncio.Task[None]


class RedisChannelLayer(CoreRedisChannelLayer):
    """``channels_redis.core.RedisChannelLayer`` with a cheaper ``group_send`` and ``receive``, which
    no socket's cancellation can cut short (see the module)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._restored: set[str] = set()  # channel keys whose old backup set was put back
        self._blocking_clients: dict[int, redis.Redis] = {}
        # The members each group had at this process's last blocking send to it (``group_send_blocking``).
        self._expected: dict[str, list[bytes]] = {}
        self._blocking_lock = threading.Lock()
        # The pump of each process channel (``specific.<client>!``, ``health.<client>!``...).
        self._pumps: dict[str, _Pump] = {}
        self._bzmpop = True  # False once Redis said it has no BZMPOP (before 7.0)

    async def receive_single(self, channel: str) -> tuple[str, dict[str, Any]]:
        """One message of ``channel`` (a process's own ``...!`` channel or a named one), in one
        ``BZPOPMIN`` (repeated every ``brpop_timeout`` while none arrives)."""
        assert self.require_valid_channel_name(channel, receive=True), "Channel name invalid"
        if "!" in channel:
            assert channel.endswith("!")
            index = self.consistent_hash(channel)
        else:
            index = next(self._receive_index_generator)
        channel_key = self.prefix + channel
        connection = self.connection(index)
        await self._restore_backup_once(connection, channel_key)
        while True:
            popped = await connection.bzpopmin(channel_key, timeout=self.brpop_timeout)
            if popped is not None:
                break
        # A plain channel's receive (not a process's): cancelled while its pop's reply is on its way,
        # the message is lost, as in channels-redis. The process channel's pop (``_pop_once``) is never
        # cancelled by a socket.
        message = self.deserialize(popped[1])
        if "__asgi_channel__" in message:
            channel = message.pop("__asgi_channel__")
        return channel, message

    async def receive(self, channel: str) -> dict[str, Any]:
        if "!" not in channel:  # a plain channel: one reader, nothing shared
            return await super().receive(channel)
        assert self.require_valid_channel_name(channel)
        process_channel = self.non_local_name(channel)
        assert process_channel.endswith(self.client_prefix + "!"), "Wrong client prefix"
        buffer = self.receive_buffer[channel]
        if not buffer.empty():
            return self._take(channel, buffer)
        pump = self._pump_for(process_channel)
        # Only this socket's own message wakes it (or the pump failing): not every pop. A plain
        # future the pump completes, not a task per message waiting on the buffer.
        arrival: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pump.waiting[channel] = arrival
        try:
            await arrival
        except asyncio.CancelledError:
            # This socket is leaving. The pump goes on for the others; what was already buffered
            # for this socket goes with it, as in channels-redis.
            self.receive_buffer.pop(channel, None)
            raise
        finally:
            if pump.waiting.get(channel) is arrival:
                del pump.waiting[channel]
        return self._take(channel, self.receive_buffer[channel])

    def _pump_for(self, process_channel: str) -> _Pump:
        """The running pump of ``process_channel`` on this loop, started if there is none."""
        loop = asyncio.get_running_loop()
        pump = self._pumps.get(process_channel)
        if pump is not None and not pump.task.done() and pump.task.get_loop() is not loop:
            if pump.task.get_loop().is_running():
                raise RuntimeError("Two event loops are trying to receive() on one channel layer at once!")
            pump = None  # a stopped loop's pump is dead
        if pump is None or pump.task.done():
            pump = _Pump()
            pump.task = asyncio.ensure_future(self._pump(process_channel, pump))
            self._pumps[process_channel] = pump
        return pump

    async def _pump(self, process_channel: str, pump: _Pump) -> None:
        """Pop the process channel into its sockets' buffers while any socket waits; a failure goes
        to the sockets waiting (each raises it), and the next receive starts a new pump."""
        try:
            while pump.waiting:
                await self._pop_once(process_channel, pump)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            waiting = [arrival for arrival in pump.waiting.values() if not arrival.done()]
            for arrival in waiting:
                arrival.set_exception(exc)
            if not waiting:
                logger.debug("the process channel's pop failed: %r", exc)

    def _take(self, channel: str, buffer: asyncio.Queue[dict[str, Any]]) -> dict[str, Any]:
        message = buffer.get_nowait()
        if buffer.empty():
            self.receive_buffer.pop(channel, None)
        return message

    async def _pop_once(self, process_channel: str, pump: _Pump) -> None:
        """One blocking pop of the process channel, up to ``brpop_timeout``, into its sockets' buffers,
        each socket waiting for a message woken. From the pop's reply to the buffers there is no await."""
        key = self.prefix + process_channel
        connection = self.connection(self.consistent_hash(process_channel))
        await self._restore_backup_once(connection, key)
        # The blocking pop of up to RECEIVE_BATCH messages in one command (BZMPOP, Redis 7+); before
        # Redis 7, BZPOPMIN and a ZPOPMIN of whatever else waits, pipelined: the same round trip.
        if self._bzmpop:
            try:
                popped = await connection.bzmpop(self.brpop_timeout, 1, [key], min=True, count=RECEIVE_BATCH)
            except ResponseError as exc:
                if "unknown command" not in str(exc).lower():
                    raise
                self._bzmpop = False
                return
            if popped is None:
                return
            members = [member for member, _ in popped[1]]
        else:
            async with connection.pipeline(transaction=False) as pipe:
                pipe.bzpopmin(key, timeout=self.brpop_timeout)
                pipe.zpopmin(key, RECEIVE_BATCH - 1)
                first, more = await pipe.execute()
            if first is None:
                return
            members = [first[1], *(member for member, _ in more)]
        for data in members:
            message = self.deserialize(data)
            if hoptrace.tracing():
                _trace_turn_end(message)
            target = message.pop("__asgi_channel__", process_channel)
            for socket_channel in target if isinstance(target, list) else [target]:
                self.receive_buffer[socket_channel].put_nowait(message)
                # The socket takes its entry out when it runs: until then the pump counts it as
                # waiting and pops on (the socket is about to wait again).
                arrival = pump.waiting.get(socket_channel)
                if arrival is not None and not arrival.done():
                    arrival.set_result(None)

    async def _restore_backup_once(self, connection: Any, key: str) -> None:
        if key not in self._restored:
            await connection.eval(RESTORE_BACKUP, 0, key, self._backup_channel_name(key))
            self._restored.add(key)

    async def close_pools(self) -> None:
        # Closing: the pops in flight are this layer's own, so they go first (their connections close).
        pops, self._pumps = [pump.task for pump in self._pumps.values()], {}
        loop = asyncio.get_running_loop()
        mine = [pop for pop in pops if not pop.done() and pop.get_loop() is loop]
        for pop in mine:
            pop.cancel()
        await asyncio.gather(*mine, return_exceptions=True)
        await super().close_pools()

    # ``group_send`` and ``group_send_blocking`` take ``skip``: a member channel left out of the
    # delivery (a socket that shows the event itself, without the round trip through Redis).
    skips_members = True

    async def group_send(self, group: str, message: dict[str, Any], *, skip: str | None = None) -> int:
        """channels-redis's ``group_send`` (one delivery script per Redis host), to every member but
        ``skip``; returns how many channels the group had (0: nobody listens; ``skip`` counted),
        which ``conversations.events.apublish_listened`` reads instead of asking Redis again. With no
        member left to deliver to, no script runs."""
        assert self.require_valid_group_name(group), "Group name not valid"
        key = self._group_key(group)
        connection = self.connection(self.consistent_hash(group))
        async with connection.pipeline(transaction=False) as pipe:
            pipe.zremrangebyscore(key, min=0, max=int(time.time()) - self.group_expiry)
            pipe.zrange(key, 0, -1)
            _, members = await pipe.execute()
        for index, keys, args in self._deliveries(members, message, skip):
            target = self.connection(index)
            try:
                over = await target.evalsha(DELIVER_SHA, len(keys), *keys, *args)
            except NoScriptError:  # first use on this server (or after SCRIPT FLUSH / a restart)
                over = await target.eval(DELIVER, len(keys), *keys, *args)
            if over:
                logger.info("%s of %s channels over capacity in group %s", over, len(members), group)
        return len(members)

    def group_send_blocking(self, group: str, message: dict[str, Any], *, skip: str | None = None) -> int:
        """``group_send`` for a synchronous caller (a request's or a database thread, a Celery worker
        thread whose event loop serves its one turn), with a blocking Redis client: the same
        commands, keys, script and capacities, without handing the send to the event loop and
        waiting for it there (``async_to_sync``: two thread switches per send). ``skip`` and the
        result as ``group_send``.

        One round trip instead of two when the group has the members this process's last send to it
        found (a turn's typing, deltas and end go to one user's group, whose sockets rarely change
        meanwhile): one script checks the members and delivers (``DELIVER_EXPECTED``). When they
        changed, nothing is delivered by it and the send goes on as before with the members it read.
        With several Redis hosts (channels on another host than the group), always as before.

        Raises:
            NotImplementedError: a host that is not given by ``address`` (Sentinel): use ``group_send``.
        """
        assert self.require_valid_group_name(group), "Group name not valid"
        key = self._group_key(group)
        index = self.consistent_hash(group)
        expected = self._expected.get(group)
        if expected is not None and self.ring_size == 1:
            members = self._send_to_expected(index, key, group, expected, message, skip)
            if members is None:
                return len(expected)
        else:
            pipe = self._blocking(index).pipeline(transaction=False)
            pipe.zremrangebyscore(key, min=0, max=int(time.time()) - self.group_expiry)
            pipe.zrange(key, 0, -1)
            _, members = pipe.execute()
        self._remember(group, members)
        for index, keys, args in self._deliveries(members, message, skip):
            target = self._blocking(index)
            try:
                over = target.evalsha(DELIVER_SHA, len(keys), *keys, *args)
            except NoScriptError:
                over = target.eval(DELIVER, len(keys), *keys, *args)
            if over:
                logger.info("%s of %s channels over capacity in group %s", over, len(members), group)
        return len(members)

    def _send_to_expected(
        self,
        index: int,
        key: bytes,
        group: str,
        expected: list[bytes],
        message: dict[str, Any],
        skip: str | None = None,
    ) -> list[bytes] | None:
        """Deliver ``message`` to ``group`` (but ``skip``) in one round trip if its members are still
        ``expected`` (``DELIVER_EXPECTED``: the check and the delivery are one atomic script): None when
        sent; otherwise nothing was delivered and the group's current members are returned."""
        deliveries = self._deliveries(expected, message, skip)
        keys: list[Any] = [key, *(k for _, channel_keys, _ in deliveries for k in channel_keys)]
        args: list[Any] = [int(time.time()) - self.group_expiry, len(expected), *expected]
        if deliveries:
            args += deliveries[0][2]
        else:
            args += [time.time(), int(self.expiry)]
        client = self._blocking(index)
        try:
            over, found = client.evalsha(DELIVER_EXPECTED_SHA, len(keys), *keys, *args)
        except NoScriptError:  # first use on this server (or after SCRIPT FLUSH / a restart)
            over, found = client.eval(DELIVER_EXPECTED, len(keys), *keys, *args)
        if over == -1:
            return list(found)
        if over:
            logger.info("%s of %s channels over capacity in group %s", over, len(expected), group)
        return None

    def _remember(self, group: str, members: list[bytes]) -> None:
        """Keep ``members`` as what the next blocking send to ``group`` expects (bounded per process)."""
        if group not in self._expected and len(self._expected) >= EXPECTED_GROUPS:
            with contextlib.suppress(KeyError, StopIteration, RuntimeError):
                del self._expected[next(iter(self._expected))]  # the oldest remembered group
        self._expected[group] = list(members)

    def _deliveries(
        self, members: list[bytes], message: dict[str, Any], skip: str | None = None
    ) -> list[tuple[int, list[str], list[Any]]]:
        """Per Redis host of the members' channels but ``skip``: its index, the channels' keys and the
        script's arguments (a message and a capacity per key, now, expiry)."""
        channel_names = [name for x in members if (name := x.decode("utf8")) != skip]
        if not channel_names:
            return []
        by_connection, messages, capacities = self._map_channel_keys_to_connection(channel_names, message)
        deliveries = []
        for index, channel_keys in by_connection.items():
            args = [messages[k] for k in channel_keys] + [capacities[k] for k in channel_keys]
            args += [time.time(), int(self.expiry)]
            deliveries.append((index, channel_keys, args))
        return deliveries

    def _blocking(self, index: int) -> redis.Redis:
        """The blocking client of host ``index`` (one per process, shared by its threads)."""
        client = self._blocking_clients.get(index)
        if client is None:
            host = dict(self.hosts[index])
            if "address" not in host:
                raise NotImplementedError("a blocking group_send needs hosts given by address")
            with self._blocking_lock:
                client = self._blocking_clients.get(index)
                if client is None:
                    address = host.pop("address")
                    # Never a blocking pop here: a send that waits longer means Redis is unreachable,
                    # and the caller (a turn, a request) must not wait on it forever.
                    for timeout in ("socket_timeout", "socket_connect_timeout"):
                        if host.get(timeout) is None:
                            host[timeout] = BLOCKING_SEND_TIMEOUT
                    # One retry (a pooled connection a Redis restart closed is reopened), not redis-py's
                    # ten: a send to a Redis that is down fails within a second or two, not ~4 s.
                    if host.get("retry") is None:
                        host["retry"] = Retry(ExponentialWithJitterBackoff(), BLOCKING_SEND_RETRIES)
                    # redis-py 8 otherwise reads its own version from the installed package's metadata
                    # for every connection it opens (~0.27 ms of CPU each; a worker's pool grows to
                    # about its thread count, and again after Redis restarts).
                    if not {"driver_info", "lib_name", "lib_version"} & host.keys():
                        host["driver_info"] = DriverInfo(lib_version=redis.__version__)
                    client = redis.Redis(connection_pool=redis.ConnectionPool.from_url(address, **host))
                    self._blocking_clients[index] = client
        return client
