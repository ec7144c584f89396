"""Scale-out as separate hosts: 2 web servers and 2 Celery workers on one PostgreSQL and one Redis.

Seven network namespaces on one bridge stand in for machines (``tests/scaleout/lan.py``):

    pg 10.213.0.10   redis 10.213.0.11   llm 10.213.0.12 (the fake Messages API)
    web1 .21  web2 .22   worker1 .31  worker2 .32   client .5 (threads of this test process)

Each process knows the others only by the addresses in ``DATABASE_URL``, ``REDIS_URL`` and
``ANTHROPIC_BASE_URL``, as on separate machines; the addresses exist only inside the namespaces.
``migrate`` runs once, from worker1's host. Turns are driven over REST through both web servers and
over a WebSocket on web1, and the database is read afterwards: every message answered exactly once,
by both workers between them (the fake LLM records which host called it), served by both web
servers (their access logs), with readiness green on both.

Needs root (network namespaces); skipped otherwise, saying why.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import psycopg
import pytest
import redis

from agentflow.testing.fake_anthropic import FakeAnthropicServer, last_user_text

from .lan import Host, Lan, sweep_leftovers, unavailable_reason
from .stack import (
    LLM_PORT,
    ROOT,
    WEB_PORT,
    django_env,
    http,
    migrate_and_create_key,
    start_postgres,
    start_valkey,
    start_web,
    start_worker,
    tail,
    until,
)

pytestmark = [pytest.mark.integration, pytest.mark.timeout(150)]

REST_TURNS = 12  # six through each web server, all at once
WORKER_CONCURRENCY = 2  # 4 turn slots in all: a burst of 12 cannot fit one worker
LLM_LATENCY = 0.4
STARTUP_SECONDS = 60


@pytest.fixture
def lan() -> Iterator[Lan]:
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(f"the scale-out test builds hosts from network namespaces: {reason}")
    sweep_leftovers()
    built = Lan()
    try:
        yield built
    finally:
        built.close()


@pytest.fixture
def run_dir() -> Iterator[Path]:
    """A folder under the worktree's .data (the PostgreSQL user can reach it), removed afterwards."""
    import shutil

    folder = ROOT / ".data" / f"scaleout-{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _on(lan: Lan, host: Host, workers: int = 1) -> ThreadPoolExecutor:
    """Threads of this process that live on ``host`` (their sockets come from its network stack)."""
    return ThreadPoolExecutor(max_workers=workers, initializer=Lan.enter, initargs=(host,))


async def _websocket_turns(
    web1: str, web2: str, api_key: str, ws_marker: str, rest_marker: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """On web1's WebSocket: a message sent there, and one the same user sends through web2's REST API."""
    headers = {"X-API-Key": api_key}
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{web1}/api/users/ws-user/chat-token", headers=headers) as response:
            assert response.status == 200, await response.text()
            token = (await response.json())["token"]
        ws = await session.ws_connect(
            f"{web1.replace('http', 'ws')}/ws/chat/?token={token}", headers={"Origin": web1}
        )

        async def frame(kind: str) -> dict[str, Any]:
            while True:
                message = await ws.receive(timeout=30)
                assert message.type == aiohttp.WSMsgType.TEXT, message
                data = json.loads(message.data)
                if data["type"] == kind:
                    return dict(data)

        await frame("ready")
        await ws.send_str(json.dumps({"type": "message", "message": ws_marker, "client_message_id": "ws-1"}))
        ack = await frame("ack")
        turn = await frame("turn")
        async with session.post(
            f"{web2}/api/users/ws-user/messages",
            headers=headers,
            json={"message": rest_marker, "wait_seconds": 0},
        ) as response:
            assert response.status == 202, await response.text()
            accepted = await response.json()
        pushed = await frame("turn")  # produced by a worker, published through Redis, sent by web1
        await ws.close()
    assert turn["message_id"] == ack["message_id"]
    assert pushed["message_id"] == accepted["message_id"]
    return turn, pushed


def _sample_connections(database_url: str, peaks: Counter[str], stop: threading.Event) -> None:
    """Until ``stop``: the most client connections seen at once from each address (this one's excluded)."""
    with psycopg.connect(database_url, autocommit=True) as connection:
        while not stop.is_set():
            rows = connection.execute(
                "SELECT host(client_addr), count(*) FROM pg_stat_activity"
                " WHERE client_addr IS NOT NULL AND pid <> pg_backend_pid() GROUP BY 1"
            ).fetchall()
            for address, count in rows:
                peaks[address] = max(peaks[address], count)
            stop.wait(0.05)


def test_two_web_servers_and_two_workers_on_one_postgresql_and_one_redis(run_dir: Path, lan: Lan) -> None:
    # run_dir first: pytest tears down in reverse, so the processes stop before their folder goes.
    started = time.monotonic()
    hosts = {
        name: lan.add_host(name, number)
        for name, number in [
            ("client", 5), ("pg", 10), ("redis", 11), ("llm", 12),
            ("web1", 21), ("web2", 22), ("worker1", 31), ("worker2", 32),
        ]
    }  # fmt: skip
    client = _on(lan, hosts["client"], workers=REST_TURNS)
    sampler_pool = _on(lan, hosts["client"])
    sampling = threading.Event()
    llm = FakeAnthropicServer(host=hosts["llm"].address, port=LLM_PORT, latency=LLM_LATENCY)
    with lan.inside(hosts["llm"]):
        llm.start()  # its serving thread starts here, so it lives on the llm host
    logs = {name: run_dir / f"{name}.log" for name in ("web1", "web2", "worker1", "worker2")}
    try:
        database_url = start_postgres(lan, hosts["pg"], run_dir / "pg")
        redis_url = start_valkey(lan, hosts["redis"], run_dir / "redis")
        env = django_env(
            database_url=database_url,
            redis_url=redis_url,
            llm_url=f"http://{hosts['llm'].address}:{LLM_PORT}",
            data_dir=run_dir / "app",
            allowed_hosts=[hosts["web1"].address, hosts["web2"].address],
        )
        env["AGENTFLOW_LOG_TASK_LINES"] = "true"  # the workers' "succeeded" lines, counted below
        client.submit(
            until,
            "PostgreSQL on 10.213.0.10",
            lambda: psycopg.connect(database_url, connect_timeout=2).close() or True,
            seconds=STARTUP_SECONDS,
            logs=[run_dir / "pg" / "postgres.log"],
        ).result()
        client.submit(
            until,
            "Valkey on 10.213.0.11",
            lambda: redis.Redis.from_url(redis_url, socket_timeout=2).ping(),
            seconds=STARTUP_SECONDS,
            logs=[run_dir / "redis" / "valkey.log"],
        ).result()
        for name in ("web1", "web2"):  # the web servers touch no table until a request comes
            start_web(lan, hosts[name], env, logs[name])
        api_key = migrate_and_create_key(lan, hosts["worker1"], env)
        migrated = time.monotonic()
        for name in ("worker1", "worker2"):
            start_worker(lan, hosts[name], env, logs[name], concurrency=WORKER_CONCURRENCY)

        webs = [f"http://{hosts[name].address}:{WEB_PORT}" for name in ("web1", "web2")]

        def both_workers_beat() -> bool:
            beats = redis.Redis.from_url(redis_url).zrange("agentflow:health:workers:agentflow", 0, -1)
            return {b.decode().split("@")[0] for b in beats} == {"worker1", "worker2"}

        client.submit(
            until,
            "both workers' heartbeats",
            both_workers_beat,
            seconds=STARTUP_SECONDS,
            logs=list(logs.values()),
        ).result()
        beating = time.monotonic()
        # What readiness says now, before the workers consume (for the printout, not asserted).
        early = client.submit(http, "GET", f"{webs[0]}/api/health/ready").result()[0]
        # The heartbeat starts before the worker's warm-up (agent, embedding model) ends; Celery logs
        # "<node> ready." once the worker consumes, so the burst below measures turns, not start-up.
        until(
            "both workers consuming",
            lambda: all(
                re.search(rf"{name}@\S+ ready\.", logs[name].read_text()) for name in ("worker1", "worker2")
            ),
            seconds=STARTUP_SECONDS,
            logs=list(logs.values()),
        )
        for web in webs:
            client.submit(
                until,
                f"{web}/api/health/ready answering 200",
                lambda web=web: http("GET", f"{web}/api/health/ready")[0] == 200,
                seconds=STARTUP_SECONDS,
                logs=list(logs.values()),
            ).result()
        ready = time.monotonic()
        # While the turns run: the most connections each host holds on PostgreSQL (pg_stat_activity).
        peaks: Counter[str] = Counter()
        sampler = sampler_pool.submit(_sample_connections, database_url, peaks, sampling)

        # A burst of REST turns, half through each web server, each waiting for its reply.
        run = uuid.uuid4().hex[:6]
        rest = [(webs[i % 2], f"rest-{i}", f"scale-out {run} rest {i}") for i in range(REST_TURNS)]
        answers = list(
            client.map(
                lambda job: http(
                    "POST",
                    f"{job[0]}/api/users/{job[1]}/messages",
                    body={"message": job[2], "wait_seconds": 30},
                    headers={"X-API-Key": api_key},
                ),
                rest,
            )
        )
        ws_marker, pushed_marker = f"scale-out {run} websocket", f"scale-out {run} via web2"
        burst = time.monotonic()
        turn, pushed = client.submit(
            asyncio.run, _websocket_turns(webs[0], webs[1], api_key, ws_marker, pushed_marker)
        ).result()
        driven = time.monotonic()
        sampling.set()
        sampler.result()

        for (_, _, marker), (status, body) in zip(rest, answers, strict=True):
            assert (status, body["status"], body["content"]) == (200, "done", f"Echo: {marker}"), body
        assert turn["content"] == f"Echo: {ws_marker}"
        assert pushed["content"] == f"Echo: {pushed_marker}"

        # The database: each message stored once and answered exactly once, nothing left behind.
        markers = [marker for _, _, marker in rest] + [ws_marker, pushed_marker]

        def rows() -> list[tuple[Any, ...]]:
            with psycopg.connect(database_url) as connection:
                return connection.execute(
                    "SELECT u.content, u.status, count(r.id), min(r.content) FROM conversations_message u"
                    " LEFT JOIN conversations_message r ON r.reply_to_id = u.id AND r.role = 'assistant'"
                    " WHERE u.role = 'user' GROUP BY u.id, u.content, u.status"
                ).fetchall()

        stored = client.submit(rows).result()
        assert sorted(stored) == sorted((m, "done", 1, f"Echo: {m}") for m in markers)

        # Both workers ran turns: the fake LLM saw each turn's call come from one worker's address.
        address = {hosts[name].address: name for name in ("worker1", "worker2")}
        callers: dict[str, set[str]] = {marker: set() for marker in markers}
        for request in llm.requests:
            text = last_user_text((request["body"] or {}).get("messages", []))
            if text in callers:
                callers[text].add(address.get(request["peer"], request["peer"]))
        assert all(len(who) == 1 for who in callers.values()), callers
        per_worker = Counter(next(iter(who)) for who in callers.values())
        assert set(per_worker) == {"worker1", "worker2"}, per_worker
        succeeded = {
            name: len(re.findall(r"Task agentflow\.process_turn\[[^]]+\] succeeded", logs[name].read_text()))
            for name in ("worker1", "worker2")
        }
        assert succeeded == dict(per_worker), (succeeded, per_worker)

        # Both web servers served, every request coming from the client host over the LAN.
        client_address = re.escape(hosts["client"].address)
        per_web = {
            name: len(
                re.findall(
                    rf"{client_address}:\d+ .*\"POST /api/users/[^\"]+/messages", logs[name].read_text()
                )
            )
            for name in ("web1", "web2")
        }
        assert per_web == {"web1": REST_TURNS // 2, "web2": REST_TURNS // 2 + 1}, per_web
        for web in webs:
            status, health = client.submit(http, "GET", f"{web}/api/health/ready").result()
            assert status == 200 and all(c["ok"] for c in health["components"].values()), health
        # Each process stays within its own pool (AGENTFLOW_DB_POOL_MAX: 4 per web, -c + 4 per worker).
        by_host = {hosts[name].address: name for name in ("web1", "web2", "worker1", "worker2")}
        held = {by_host.get(address, address): count for address, count in peaks.items()}
        assert set(held) <= set(by_host.values()), held
        assert all(held.get(web, 0) <= 4 for web in ("web1", "web2")), held
        assert all(held.get(w, 0) <= WORKER_CONCURRENCY + 4 for w in ("worker1", "worker2")), held
        print(
            f"\nscale-out: turns per worker {dict(sorted(per_worker.items()))}, REST posts per web {per_web},"
            f" peak PostgreSQL connections per host {dict(sorted(held.items()))},"
            f" WebSocket turns on web1 2; setup {migrated - started:.1f} s (migrate included),"
            f" after migrate: workers beating {beating - migrated:.1f} s (readiness then {early}),"
            f" consuming {ready - migrated:.1f} s,"
            f" REST burst {burst - ready:.1f} s,"
            f" WebSocket {driven - burst:.1f} s,"
            f" total {time.monotonic() - started:.1f} s",
            file=sys.stderr,
        )
    except BaseException:
        for name, log in logs.items():
            print(f"--- {name}\n{tail(log, 40)}", file=sys.stderr)
        raise
    finally:
        sampling.set()
        for pool in (client, sampler_pool):  # their threads live in the client namespace: let them end
            pool.shutdown(wait=False, cancel_futures=True)
        llm.stop()


def test_the_skip_reason_names_what_is_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    from . import lan as lan_module

    monkeypatch.setattr(lan_module.os, "geteuid", lambda: 1000)
    assert unavailable_reason() == "network namespaces need root; running as uid 1000"


def test_leftovers_of_a_dead_run_are_swept_and_a_live_runs_are_kept() -> None:
    if (reason := unavailable_reason()) is not None:
        pytest.skip(f"needs network namespaces: {reason}")
    from .lan import PREFIX, _ip, namespaces

    dead = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # a pid no process can have
    left, live = f"{PREFIX}-{dead}-pg", f"{PREFIX}-{os.getpid()}-kept"
    _ip("netns", "add", left)
    _ip("netns", "add", live)
    try:
        assert left in sweep_leftovers()
        assert left not in namespaces() and live in namespaces()
    finally:
        for name in (left, live):
            if name in namespaces():
                _ip("netns", "del", name)
