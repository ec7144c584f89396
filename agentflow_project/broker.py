"""The Celery broker transport: kombu's Redis transport, made to survive a Redis outage.

With kombu 5.7 / Celery 5.7, when the worker loses Redis it first ``collect()``s the broken broker
connection and then closes it; closing its channel tries to hand the unacknowledged (``acks_late``)
turn tasks back to Redis, reaches for the connection ``collect()`` has already dropped, and raises
``AttributeError: 'NoneType' object has no attribute 'hostname'``. That error is not a connection
error, so nothing catches it and the worker process exits ("Unrecoverable error") after an outage
of a few seconds. Here the hand-back is skipped instead: Redis is down, so it could not succeed
anyway, and the tasks are still in Redis's unacked set, which redelivers them after the visibility
timeout (``agentflow.limits.VISIBILITY_TIMEOUT``) unless the turns finish and acknowledge first.

Selected with ``CELERY_BROKER_TRANSPORT`` (settings); ``CELERY_BROKER_URL`` stays a ``redis://`` URL.
"""

from __future__ import annotations

import logging
from typing import Any

from kombu.transport import redis as kombu_redis

logger = logging.getLogger("agentflow.broker")


class QoS(kombu_redis.QoS):
    def restore_unacked(self, client: Any = None) -> Any:
        try:
            return super().restore_unacked(client)
        except AttributeError:
            if getattr(self.channel.connection, "client", None) is not None:
                raise  # not the closed-connection case: a real bug, let it show
            logger.warning(
                "broker connection lost: %s unacknowledged task(s) stay in Redis and are redelivered"
                " after the visibility timeout",
                len(self._delivered),
            )
            self._delivered.clear()
            return None


class Channel(kombu_redis.Channel):
    QoS = QoS


class Transport(kombu_redis.Transport):
    Channel = Channel
