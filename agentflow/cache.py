"""Django's Redis cache with one connection pool per process, not one per request or task.

Django keeps a cache object per async context (``caches`` is an asgiref ``Local``): every request
and WebSocket connection in the web process, and every turn's task in a worker thread, builds its
own ``RedisCache``, and with it its own ``RedisCacheClient``, connection pool and a fresh TCP
connection to Redis (``HELLO`` and two ``CLIENT SETINFO`` before the first command). An open
WebSocket kept that connection as long as it lived. Here the cache objects stay per context, as
Django wants, but share one client (pool) per process and configuration; redis-py's pools are
thread-safe. Django's client also built a new ``redis.Redis`` around that pool for every command
(``get_client``: ~0.1 ms of CPU each with redis-py 8, on every chat message's revocation check);
:class:`SharedRedisCacheClient` keeps one per pool. A ``redis.Redis`` holds no connection of its own:
each command checks one out of the pool, which reconnects after Redis restarts, as before.
Everything else is Django's ``django.core.cache.backends.redis.RedisCache``.

    CACHES = {"default": {"BACKEND": "agentflow.cache.RedisCache", "LOCATION": REDIS_URL}}
"""

from __future__ import annotations

import re
import threading
from typing import Any

from django.core.cache.backends.redis import RedisCache as DjangoRedisCache
from django.core.cache.backends.redis import RedisCacheClient
from django.utils.functional import cached_property

_lock = threading.Lock()
_clients: dict[str, RedisCacheClient] = {}


class SharedRedisCacheClient(RedisCacheClient):
    """Django's client with one ``redis.Redis`` per connection pool instead of one per command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._redis_by_pool: dict[int, Any] = {}

    def get_client(self, key: Any = None, *, write: bool = False) -> Any:
        django_client: Any = self  # Django's private helpers, untyped in its stubs
        pool = django_client._get_connection_pool(write)
        client = self._redis_by_pool.get(id(pool))
        if client is None:  # a race builds two; one is kept, both work (the pool is what is shared)
            client = self._redis_by_pool.setdefault(id(pool), django_client._client(connection_pool=pool))
        return client


class RedisCache(DjangoRedisCache):
    """``django.core.cache.backends.redis.RedisCache`` sharing its client process-wide (see the module)."""

    def __init__(self, server: str | list[str], params: dict[str, Any]) -> None:
        super().__init__(server, params)
        self._shared_servers = re.split("[;,]", server) if isinstance(server, str) else list(server)
        self._shared_options = dict(params.get("OPTIONS", {}))

    @cached_property
    def _cache(self) -> RedisCacheClient:
        key = repr((self._shared_servers, sorted(self._shared_options.items(), key=lambda kv: kv[0])))
        with _lock:
            client = _clients.get(key)
            if client is None:
                client = _clients[key] = SharedRedisCacheClient(self._shared_servers, **self._shared_options)
            return client
