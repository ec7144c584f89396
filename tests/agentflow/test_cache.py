"""The Redis cache shares one client (connection pool) per process across requests, tasks and threads."""

from __future__ import annotations

import asyncio
import threading
import uuid
from typing import Any

from asgiref.sync import sync_to_async
from django.core.cache import caches

from agentflow.cache import RedisCache


def _client_in_a_new_task() -> Any:
    """The cache client a fresh asyncio task sees, as a request, a socket or a turn would."""

    async def task() -> Any:
        await sync_to_async(caches["default"].get, thread_sensitive=False)("warm")
        return caches["default"]._cache

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(task())
    finally:
        loop.close()


def test_every_task_and_thread_uses_the_one_client_of_the_process() -> None:
    assert isinstance(caches["default"], RedisCache)
    seen = [_client_in_a_new_task() for _ in range(3)]
    thread = threading.Thread(target=lambda: seen.append(_client_in_a_new_task()))
    thread.start()
    thread.join()

    assert len({id(client) for client in seen}) == 1
    assert seen[0] is caches["default"]._cache


def test_a_value_written_in_one_task_is_read_in_another() -> None:
    key = f"shared-{uuid.uuid4().hex}"

    async def write() -> None:
        await sync_to_async(caches["default"].set)(key, {"n": 1}, 30)

    async def read() -> Any:
        return await sync_to_async(caches["default"].get)(key)

    asyncio.run(write())
    try:
        assert asyncio.run(read()) == {"n": 1}
    finally:
        caches["default"].delete(key)


def test_caches_with_other_settings_get_their_own_client() -> None:
    location = caches["default"]._shared_servers[0]
    one = RedisCache(location, {"OPTIONS": {"db": 0}})
    other = RedisCache(location, {"OPTIONS": {"db": 1}})
    again = RedisCache(location, {"OPTIONS": {"db": 0}})

    assert one._cache is again._cache
    assert one._cache is not other._cache


def test_each_command_reuses_one_redis_client_per_pool() -> None:
    client = caches["default"]._cache
    first, again = client.get_client("a"), client.get_client("b", write=True)

    assert first is again  # one server: reads and writes share its pool, and its client
    assert first.connection_pool is client._get_connection_pool(True)


def test_the_kept_client_reconnects_after_redis_drops_its_connections() -> None:
    """A Redis restart closes every connection: the kept client's next command opens a new one."""
    cache = caches["default"]
    key = f"restart-{uuid.uuid4().hex}"
    cache.set(key, "kept", 30)
    kept = cache._cache.get_client(key)
    ids = {kept.client_id()}  # the pool's idle connection (this thread takes it again next)
    killer = kept.__class__.from_url(cache._shared_servers[0])
    try:
        for client_id in ids:
            assert killer.client_kill_filter(_id=client_id) == 1

        assert cache.get(key) == "kept"
        assert cache._cache.get_client(key) is kept
        assert kept.client_id() not in ids  # a new connection
    finally:
        killer.close()
        cache.delete(key)
