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

Selected with ``CELERY_BROKER_TRANSPORT`` (settings); ``CELERY_BROKER_URL`` stays a ``redis://`` URL.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

logger = logging.getLogger("agentflow.broker")


class QoS(kombu_redis.QoS):
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
        try:
            super().ack(delivery_tag)
        except AttributeError:
            if not self._closed():
                raise
            logger.warning("broker connection lost: task %s could not be acknowledged", delivery_tag)

    def reject(self, delivery_tag: Any, requeue: bool = False) -> None:
        try:
            super().reject(delivery_tag, requeue=requeue)
        except AttributeError:
            if not self._closed():
                raise
            logger.warning("broker connection lost: task %s could not be rejected", delivery_tag)


class Channel(kombu_redis.Channel):
    QoS = QoS
    _sync_client: Any = None

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
