"""The Celery broker transport: kombu's Redis transport, made to survive a Redis outage.

With kombu 5.7 / Celery 5.7, when the worker loses Redis it first ``collect()``s the broken broker
connection and then closes it; closing its channel tries to hand the unacknowledged (``acks_late``)
turn tasks back to Redis, reaches for the connection ``collect()`` has already dropped, and raises
``AttributeError: 'NoneType' object has no attribute 'hostname'``. That error is not a connection
error, so nothing catches it and the worker process exits ("Unrecoverable error") after an outage
of a few seconds. A turn finishing after that acknowledges its task on the dead channel and meets
the same error. Here both are skipped instead: Redis is down (or the channel is gone), so they could
not succeed anyway, and the tasks are still in Redis's unacked set, which redelivers them after the
visibility timeout (``agentflow.limits.VISIBILITY_TIMEOUT``); a redelivered turn that is done is only
re-read.

Two more changes serve a threads-pool worker under load, whose one consumer thread competes for the
GIL with every task thread (docs/operations.md, "Tail latency of chatting users"): the tasks waiting
behind a BRPOP are taken, within the worker's free prefetch slots, in one round trip that also records
them as unacknowledged (``Channel._brpop_read``), and each task's thread sends its own acknowledgement
(``Consumer``, selected with ``CELERY_WORKER_CONSUMER``).

Selected with ``CELERY_BROKER_TRANSPORT`` (settings); ``CELERY_BROKER_URL`` stays a ``redis://`` URL.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from celery.worker.consumer import Consumer as CeleryConsumer
from kombu.transport import redis as kombu_redis
from kombu.transport import virtual as kombu_virtual
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

logger = logging.getLogger("agentflow.broker")


class QoS(kombu_redis.QoS):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Delivery tags already recorded as unacknowledged by the script that took them (TAKE_WAITING).
        self.recorded: set[str] = set()

    def append(self, message: Any, delivery_tag: Any) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
            kombu_virtual.QoS.append(self, message, delivery_tag)  # no second round trip
            return
        super().append(message, delivery_tag)

    def _closed(self) -> bool:
        """Whether this channel's broker connection was collected (the AttributeError's cause)."""
        return getattr(getattr(self.channel, "connection", None), "client", None) is None

    def restore_unacked(self, client: Any = None) -> Any:
        try:
            return super().restore_unacked(client)
        except AttributeError:
            if not self._closed():
                raise  # not the closed-connection case: a real bug, let it show
            logger.warning(
                "broker connection lost: %s unacknowledged task(s) stay in Redis and are redelivered"
                " after the visibility timeout",
                len(self._delivered),
            )
            self._delivered.clear()
            return None

    def ack(self, delivery_tag: Any) -> None:
        # A turn that finishes after the connection it came on was lost acknowledges on a dead
        # channel: the same AttributeError. The task stays unacked in Redis and is redelivered after
        # the visibility timeout; the turn is done by then, so the redelivery only re-reads it.
        full = not self.can_consume()
        try:
            super().ack(delivery_tag)
        except AttributeError:
            if not self._closed():
                raise
            logger.warning("broker connection lost: task %s could not be acknowledged", delivery_tag)
        if full:
            self._wake_consumer()

    def _wake_consumer(self) -> None:
        """A slot is free again on a channel that was full: wake the worker's event loop so that it
        asks for the next task now (with no task asked for, nothing else may wake it for seconds)."""
        hub = getattr(self.channel.connection, "hub", None)
        if hub is not None:
            hub.call_soon(_nothing)  # from another thread: wakes the loop; from the loop: a no-op

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except AttributeError:
            if not self._closed():
                raise
            logger.warning("broker connection lost: task %s could not be rejected", delivery_tag)


# KEYS: the queue's lists in kombu's priority order, then the unacked index and the unacked hash;
# ARGV[1]: at most this many; ARGV[2]: now. Pops them as BRPOP would, one after another (the first
# non-empty list first), records each as unacknowledged exactly as kombu's QoS.append does (the same
# index score, the same hash entry: [the message as stored, its exchange, its routing key]) in the same
# atomic step, and returns [key, message, ...]: a task taken here is in Redis's unacked set before it
# leaves Redis, so no reply lost on the way can lose it.
TAKE_WAITING = """
local n = #KEYS - 2
local index, unacked = KEYS[n + 1], KEYS[n + 2]
local now = tonumber(ARGV[2])
local left = tonumber(ARGV[1])
local out = {}
for i = 1, n do
    while left > 0 do
        local item = redis.call('RPOP', KEYS[i])
        if not item then break end
        local properties = cjson.decode(item)['properties']
        local info = properties['delivery_info']
        local tag = properties['delivery_tag']
        redis.call('ZADD', index, now, tag)
        redis.call('HSET', unacked, tag,
            '[' .. item .. ',' .. cjson.encode(info['exchange']) .. ',' .. cjson.encode(info['routing_key']) .. ']')
        out[#out + 1] = KEYS[i]
        out[#out + 1] = item
        left = left - 1
    end
    if left == 0 then break end
end
return out
"""
# Tasks a worker takes in one round trip after its BRPOP's one, within its free prefetch slots.
TAKE_BATCH = 16


class Channel(kombu_redis.Channel):
    QoS = QoS
    _sync_client: Any = None

    def _brpop_read(self, **options: Any) -> Any:
        """kombu's BRPOP read, then, on the same connection, the tasks that wait behind the one it
        got, up to the worker's free prefetch slots (``TAKE_BATCH`` at most), in one round trip.

        kombu takes one task per BRPOP, and each BRPOP waits for a turn of the worker's event loop on
        a thread that competes for the GIL with every turn thread: under load a task came every
        ~19-30 ms while tasks waited in Redis and threads were free (docs/operations.md, "Tail latency
        of chatting users"). Each task taken here is recorded as unacknowledged by the script that
        takes it (``TAKE_WAITING``, as kombu records BRPOP's) and then delivered as BRPOP's is, so
        ``acks_late`` redelivery is as before.
        """
        delivered = super()._brpop_read(**options)
        self._take_waiting()
        return delivered

    def _take_waiting(self) -> None:
        free = self.qos.can_consume_max_estimate()
        if not free or self.global_keyprefix or self.connection is None:
            return
        keys = [self._q_for_pri(queue, pri) for pri in self.priority_steps for queue in self.active_queues]
        connection = self.client.connection
        if not keys or connection is None:
            return
        keys += [self.unacked_index_key, self.unacked_key]
        try:
            connection.send_command(
                "EVAL", TAKE_WAITING, len(keys), *keys, min(free, TAKE_BATCH), time.time()
            )
            taken = self.client.parse_response(connection, "EVAL")
        except self.connection_errors:
            connection.disconnect()  # as kombu's BRPOP read: the next poll reconnects
            raise
        for n in range(0, len(taken or ()), 2):
            dest = bytes_to_str(taken[n]).rsplit(self.sep, 1)[0]
            payload = loads(bytes_to_str(taken[n + 1]))
            self.qos.recorded.add(payload["properties"]["delivery_tag"])
            self._queue_cycle.rotate(dest)
            self.connection._deliver(payload, dest)

    def _create_client(self, asynchronous: bool = False) -> Any:
        """kombu's synchronous client for this channel's pool, made once rather than per command.

        kombu makes a new ``redis.Redis`` for every command it sends outside the event loop: twice
        per task (recording it as unacknowledged on delivery, then the ack), ~0.1 ms of CPU each with
        redis-py 8. A client is a thin, thread-safe handle on the pool; a new one is made when the
        channel's pool is replaced (after a connection error).
        """
        if asynchronous:
            return super()._create_client(asynchronous=asynchronous)
        client = self._sync_client
        if client is None or client.connection_pool is not self.pool:
            client = self._sync_client = super()._create_client()
        return client


class Transport(kombu_redis.Transport):
    Channel = Channel
    hub: Any = None  # the worker's event loop, once registered with it

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self.hub = loop
        super().register_with_event_loop(connection, loop)


def _nothing() -> None:
    return None


class Consumer(CeleryConsumer):
    """Celery's worker consumer, acknowledging a task on the thread that ran it.

    Celery hands every acknowledgement (``acks_late``: after the task) to the worker's event loop
    (``call_soon``): one wake-up of its thread and one Redis round trip there per task, on the one
    thread that also fetches every task and, in a threads pool, competes for the GIL with all the
    task threads. Here the task's own thread sends it (kombu's Redis QoS takes acknowledgements
    from any thread: the delivered set is updated by the event loop's thread, from the acknowledged
    set), and the event loop is woken only when the acknowledgement frees a slot of a full worker
    (``QoS.ack``). What is acknowledged, and when (after the task), is as before: a killed worker's
    task is still redelivered. Selected with ``CELERY_WORKER_CONSUMER`` (settings).
    """

    def call_soon_ack(self, p: Any, *args: Any, **kwargs: Any) -> Any:
        if self.hub is None or not _pool_is_threads(self):
            return super().call_soon_ack(p, *args, **kwargs)
        try:
            p(*args, **kwargs)
        except Exception as exc:  # as Celery's immediate path: logged, the task stays unacked
            logger.exception("acknowledgement failed: %r", exc)
        return p


def _pool_is_threads(consumer: Any) -> bool:
    from celery.concurrency.thread import TaskPool

    return isinstance(getattr(consumer, "pool", None), TaskPool)
