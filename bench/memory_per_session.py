"""Resident memory of the web process and the worker per active chat session.

    python bench/memory_per_session.py [--users 100,1000] [--concurrency 16]

Starts a private stack (``bench/private_stack.py``: its own PostgreSQL, Valkey, fake LLM, daphne and
a Celery worker, production settings), warms it up with a few turns, reads each process's ``VmRSS``,
then brings the number of active sessions up to each ``--users`` figure in turn: a new user opens a
WebSocket, sends one message, reads up to its ``turn`` frame and stays connected. After each step
(2 s to settle) it prints both processes' RSS and the growth since the warm-up as MB per 100 active
sessions; then closes them all and reads RSS again (``--cycles``: as often, with new users, which
tells memory a process keeps per closed session from memory its allocator kept). Also says whether the web process has onnxruntime (the embedding model) mapped.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from private_stack import BenchStack, rss_mib, ws_turn


async def open_session(session: Any, url: str, origin: str, n: int) -> Any:
    """One user: connect, send a message, read up to its turn; the socket stays open."""
    ws = await session.ws_connect(url, headers={"Origin": origin}, heartbeat=None)
    ready = await ws.receive_json(timeout=60)
    if ready.get("type") != "ready":
        raise RuntimeError(f"handshake: {ready}")
    await ws_turn(ws, f"Where is order {n}?", frame_seconds=120)
    return ws


async def drain(ws: Any) -> None:
    """Keep reading (a browser does): answers pings, takes events."""
    async for _ in ws:
        pass


async def drive(
    stack: BenchStack, steps: list[int], concurrency: int, pids: dict[str, int], cycles: int
) -> None:
    import aiohttp

    from conversations.chat_tokens import chat_token_create

    ws_base = stack.base.replace("http://", "ws://")
    sockets: list[Any] = []
    readers: list[asyncio.Task[None]] = []
    gate = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def one(n: int) -> None:
            token = chat_token_create(external_id=f"mem-{n}")
            async with gate:
                ws = await open_session(session, f"{ws_base}/ws/chat/?token={token}", stack.base, n)
            sockets.append(ws)
            readers.append(asyncio.create_task(drain(ws)))

        for n in range(4):  # warm up: first turns load the model, open pools
            await one(-1 - n)
        await asyncio.sleep(3)
        base = {name: rss_mib(pid) for name, pid in pids.items()}
        base_count = len(sockets)
        print(f"after warm-up ({base_count} sessions): {_fmt(base)}")
        first = 0
        for cycle in range(cycles):
            done = 0
            for target in steps:
                began = time.perf_counter()
                await asyncio.gather(*(one(first + n) for n in range(done, target)))
                took = time.perf_counter() - began
                done = target
                await asyncio.sleep(2)
                now = {name: rss_mib(pid) for name, pid in pids.items()}
                per100 = {name: (now[name] - base[name]) / target * 100 for name in pids}
                print(
                    f"{target:5d} active sessions (+{target} turns in {took:5.1f} s): {_fmt(now)};"
                    " per 100 sessions: " + ", ".join(f"{k} {v:+.2f} MB" for k, v in per100.items())
                )
            first += done
            count = len(sockets)
            for ws in sockets:
                await ws.close()
            for task in readers:
                task.cancel()
            sockets.clear()
            readers.clear()
            await asyncio.sleep(3)
            closed = {name: rss_mib(pid) for name, pid in pids.items()}
            print(f"cycle {cycle + 1}: all {count} sockets closed: {_fmt(closed)}")


def _fmt(rss: dict[str, float]) -> str:
    return ", ".join(f"{name} {mib:6.1f} MiB" for name, mib in rss.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", default="100,1000", help="active sessions to reach, in steps")
    parser.add_argument("--concurrency", type=int, default=16, help="sessions being opened at once")
    parser.add_argument(
        "--cycles", type=int, default=1, help="open and close the sessions this often (new users each time)"
    )
    args = parser.parse_args()
    steps = sorted({int(v) for v in args.users.split(",")})
    if not steps or steps[0] < 1:
        parser.error("--users needs positive numbers")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 65536)), hard))

    stack = BenchStack(concurrency=8, AGENTFLOW_WS_CONNECTIONS_PER_USER="5")
    try:
        stack.up()
        pids = {"web": stack.web.pid, "worker": stack.worker.pid}
        started = {name: rss_mib(pid) for name, pid in pids.items()}
        print(f"{os.cpu_count()} CPUs; at start: {_fmt(started)}")
        asyncio.run(drive(stack, steps, args.concurrency, pids, args.cycles))
        mapped = "onnxruntime" in Path(f"/proc/{stack.web.pid}/maps").read_text()
        print(f"onnxruntime (the embedding model) mapped in the web process: {mapped}")
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
