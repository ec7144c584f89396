"""The Celery broker transport (agentflow_project.broker): tasks waiting behind a BRPOP are taken in the
same poll, within the consumer's free prefetch slots, each recorded as unacknowledged as kombu records
BRPOP's one, so an unacknowledged task (a killed worker) still goes back to the queue."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from django.conf import settings
from kombu import Connection, Consumer, Exchange, Producer, Queue

from agentflow_project import broker

TRANSPORT = "agentflow_project.broker:Transport"


_NAME = f"test-broker-{uuid.uuid4().hex[:8]}"
# This module's own unacknowledged set (the default one is shared by every consumer of this Redis).
OPTIONS = {
    "unacked_key": f"{_NAME}-unacked",
    "unacked_index_key": f"{_NAME}-unacked-index",
    "unacked_mutex_key": f"{_NAME}-unacked-mutex",
}


def _connection() -> Connection:
    return Connection(settings.REDIS_URL, transport=TRANSPORT, transport_options=OPTIONS)


@pytest.fixture
def queue() -> Iterator[Queue]:
    name = f"{_NAME}-{uuid.uuid4().hex[:8]}"
    yield Queue(name, Exchange(name, type="direct"), routing_key=name)
    client = redis.Redis.from_url(settings.REDIS_URL)
    client.delete(name, *OPTIONS.values())
    client.close()


def _publish(queue: Queue, bodies: list[str]) -> None:
    with _connection() as conn:
        producer = Producer(conn.channel())
        for body in bodies:
            producer.publish(body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue])


def _waiting(queue: Queue) -> int:
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        return int(client.llen(queue.name))
    finally:
        client.close()


def _consume(conn: Connection, queue: Queue, prefetch: int, got: list[Any]) -> Any:
    channel = conn.channel()
    consumer = Consumer(
        channel, queues=[queue], callbacks=[lambda body, message: got.append((body, message))]
    )
    consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    return channel


def test_tasks_waiting_are_taken_in_one_poll_within_the_free_prefetch_slots(queue: Queue) -> None:
    _publish(queue, [f"task {n}" for n in range(7)])
    got: list[Any] = []
    with _connection() as conn:
        channel = _consume(conn, queue, prefetch=4, got=got)

        conn.drain_events(timeout=5)  # one BRPOP read

        assert [body for body, _ in got] == ["task 0", "task 1", "task 2", "task 3"]
        assert _waiting(queue) == 3
        assert len(channel.qos._delivered) == 4  # each one unacknowledged, as BRPOP's
        for _, message in got:
            message.ack()
        got.clear()
        conn.drain_events(timeout=5)
        assert [body for body, _ in got] == ["task 4", "task 5", "task 6"]
        for _, message in got:
            message.ack()
    assert _waiting(queue) == 0


def test_tasks_taken_together_are_recorded_unacknowledged_as_kombu_records_them(queue: Queue) -> None:
    _publish(queue, ["brpop's", "taken 1", "taken 2"])
    got: list[Any] = []
    client = redis.Redis.from_url(settings.REDIS_URL)
    with _connection() as conn:
        _consume(conn, queue, prefetch=3, got=got)
        conn.drain_events(timeout=5)
        assert [body for body, _ in got] == ["brpop's", "taken 1", "taken 2"]

        # The first recorded by kombu's QoS.append, the others by the script that took them: the same.
        for _, message in got:
            stored = json.loads(client.hget(OPTIONS["unacked_key"], message.delivery_tag))
            assert stored == [message._raw, queue.name, queue.routing_key]
            assert client.zscore(OPTIONS["unacked_index_key"], message.delivery_tag) is not None
        for _, message in got:
            message.ack()
    assert client.hlen(OPTIONS["unacked_key"]) == 0
    assert client.zcard(OPTIONS["unacked_index_key"]) == 0
    client.close()


def test_a_full_consumer_takes_no_more_than_brpop_gives(queue: Queue) -> None:
    _publish(queue, ["only", "later"])
    got: list[Any] = []
    with _connection() as conn:
        _consume(conn, queue, prefetch=1, got=got)
        conn.drain_events(timeout=5)
        assert [body for body, _ in got] == ["only"]
        assert _waiting(queue) == 1
        got[0][1].ack()


def test_tasks_taken_in_a_batch_and_never_acknowledged_go_back_to_the_queue(queue: Queue) -> None:
    _publish(queue, [f"task {n}" for n in range(5)])
    got: list[Any] = []
    with _connection() as conn:
        _consume(conn, queue, prefetch=5, got=got)
        conn.drain_events(timeout=5)
        assert len(got) == 5
        assert _waiting(queue) == 0
    # The connection closed with five unacknowledged tasks (a worker stopping mid-turn): back in Redis.
    assert _waiting(queue) == 5
    again: list[Any] = []
    with _connection() as conn:
        _consume(conn, queue, prefetch=5, got=again)
        conn.drain_events(timeout=5)
        assert sorted(body for body, _ in again) == [f"task {n}" for n in range(5)]
        for _, message in again:
            message.ack()


def test_the_batch_is_capped(queue: Queue) -> None:
    _publish(queue, [f"task {n}" for n in range(broker.TAKE_BATCH + 5)])
    got: list[Any] = []
    with _connection() as conn:
        _consume(conn, queue, prefetch=100, got=got)
        conn.drain_events(timeout=5)
        assert len(got) == 1 + broker.TAKE_BATCH
        for _, message in got:
            message.ack()
        got.clear()
        conn.drain_events(timeout=5)
        assert len(got) == 4
        for _, message in got:
            message.ack()


class _Loop:
    """Stands for the worker's event loop: records the wake-ups asked of it."""

    def __init__(self) -> None:
        self.woken = 0

    def call_soon(self, callback: Any) -> None:
        self.woken += 1


def test_an_ack_that_frees_a_full_consumer_wakes_its_event_loop(queue: Queue) -> None:
    _publish(queue, ["first", "second", "third"])
    got: list[Any] = []
    with _connection() as conn:
        _consume(conn, queue, prefetch=2, got=got)
        loop = conn.transport.hub = _Loop()
        conn.drain_events(timeout=5)
        assert len(got) == 2  # full

        thread = threading.Thread(target=got[0][1].ack)  # a task's own thread acknowledges
        thread.start()
        thread.join()
        assert loop.woken == 1  # it was full: the loop must ask for the next task now

        got[1][1].ack()
        assert loop.woken == 1  # a slot was free already: nothing to wake
        got.clear()
        conn.drain_events(timeout=5)
        assert [body for body, _ in got] == ["third"]
        got[0][1].ack()


def test_a_worker_acknowledges_each_task_on_the_thread_that_ran_it(
    celery_worker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from agentflow_project.celery import app

    acked_on: list[int] = []
    ack = broker.QoS.ack

    def recording_ack(self: broker.QoS, delivery_tag: Any) -> None:
        acked_on.append(threading.get_ident())
        ack(self, delivery_tag)

    monkeypatch.setattr(broker.QoS, "ack", recording_ack)
    loop_thread = celery_worker.consumer.hub._loop_thread
    results = [app.send_task("celery.accumulate", args=(n,)) for n in range(6)]
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        for _ in range(300):  # the tasks run and are acknowledged (no result backend to wait on)
            if len(acked_on) == len(results):
                break
            threading.Event().wait(0.05)
        assert len(acked_on) == len(results)
        assert loop_thread not in acked_on
        ids = {r.id for r in results}
        unacked = [v.decode() for v in client.hvals("unacked")]  # every worker's of this Redis
        assert not [task for task in ids if any(task in value for value in unacked)]
    finally:
        client.close()
