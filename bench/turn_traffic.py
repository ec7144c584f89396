"""Valkey commands, channel-layer sends and CPU per turn, REST and WebSocket, 1-chunk and 12-chunk replies.

    python bench/turn_traffic.py [--turns 40] [--concurrency 4] [--chunk-delay 0.02] [--breakdown]

Starts a private stack (``bench/private_stack.py``: its own PostgreSQL, Valkey, fake LLM, daphne and
a Celery worker, production settings) and runs, for each case, ``--turns`` turns of a few warmed-up
users (``--concurrency`` at a time, each user one turn at a time):

* ``rest``: ``POST /api/users/<id>/messages`` waiting for the reply (no socket open);
* ``ws``: the user's WebSocket sends a ``message`` frame and reads up to the ``turn`` frame.

The fake LLM's reply is one word (1 streamed chunk) or twelve (12 chunks, ``--chunk-delay`` seconds
apart, as a model writes). Printed per turn: Valkey commands (``INFO commandstats`` of the private
Valkey, commands inside scripts included) with the largest kinds, and CPU ms of daphne, the worker
and Valkey. The stack's idle traffic and CPU (heartbeats, blocking pops that time out, the beat) are
measured for ``--idle`` seconds first and subtracted, pro rata of each case's duration.
``--breakdown`` also records one case's top-level commands with ``MONITOR`` and groups them by what
sent them (channel layer, Celery, cache, turn signal), counting ``group_send`` calls.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from private_stack import BenchStack, commandstats, cpu_seconds, machine_busy, ws_turn

WORDS = "Thanks for the details; your backup settings are saved and will run tonight at nine.".split()


def reply_of(chunks: int) -> Any:
    from agentflow.testing.fake_anthropic import FakeReply

    text = " ".join((WORDS * 2)[:chunks]) if chunks > 1 else "Done."
    return lambda body: FakeReply(text=text)


class Case:
    def __init__(self, name: str, turns: int, seconds: float, calls: dict[str, int], cpu: dict[str, float]):
        self.name, self.turns, self.seconds, self.calls, self.cpu = name, turns, seconds, calls, cpu


async def rest_turns(base: str, api_key: str, users: list[str], turns: int, concurrency: int) -> None:
    import aiohttp

    async with aiohttp.ClientSession(headers={"X-API-Key": api_key}) as session:

        async def one(user: str, count: int) -> None:
            for n in range(count):
                async with session.post(
                    f"{base}/api/users/{user}/messages", json={"message": f"How do I set up backups? {n}"}
                ) as response:
                    body = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"REST turn: {response.status} {body}")

        await asyncio.gather(*(one(u, turns // len(users)) for u in users[:concurrency]))


async def ws_turns(base: str, tokens: list[str], turns: int, concurrency: int) -> None:
    import aiohttp

    ws_base = base.replace("http://", "ws://")
    async with aiohttp.ClientSession() as session:

        async def one(token: str, count: int) -> None:
            async with session.ws_connect(
                f"{ws_base}/ws/chat/?token={token}", headers={"Origin": base}
            ) as ws:
                ready = await ws.receive_json(timeout=30)
                if ready.get("type") != "ready":
                    raise RuntimeError(f"WebSocket: {ready}")
                for n in range(count):
                    await ws_turn(ws, f"Backups? {n}", frame_seconds=60)

        await asyncio.gather(*(one(t, turns // len(tokens)) for t in tokens[:concurrency]))


def measure(
    stack: BenchStack, pids: dict[str, int], run: Any
) -> tuple[float, dict[str, int], dict[str, float]]:
    client = stack.redis()
    before_calls = commandstats(client)
    before_cpu = {name: cpu_seconds(pid) for name, pid in pids.items()}
    began = time.perf_counter()
    run()
    seconds = time.perf_counter() - began
    cpu = {name: cpu_seconds(pid) - before_cpu[name] for name, pid in pids.items()}
    after_calls = commandstats(client)
    calls = {k: v - before_calls.get(k, 0) for k, v in after_calls.items() if v - before_calls.get(k, 0)}
    calls["info"] = calls.get("info", 0) - 1  # our own INFO
    client.close()
    return seconds, calls, cpu


class Monitor(threading.Thread):
    """Top-level commands as ``MONITOR`` shows them (not the ones scripts run), with the sender's port."""

    def __init__(self, stack: BenchStack) -> None:
        super().__init__(daemon=True)
        self.stack = stack
        self.entries: list[tuple[int, str]] = []
        self.stop_at: float | None = None

    def run(self) -> None:
        client = self.stack.redis()
        with client.monitor() as monitor:
            for entry in monitor.listen():
                port = int(str(entry.get("client_port") or 0) or 0)
                self.entries.append((port, entry["command"]))
                if self.stop_at is not None and time.time() > self.stop_at:
                    return


SCRIPTS = [  # scripts by a phrase of their body
    ("group_send deliver", "over_capacity"),
    ("receive cleanup", "backed_up"),
    ("rate-limit bucket", "HMGET"),
    ("connection count", "ZSCORE"),
]
ID = re.compile(r"[0-9a-f]{8,}|\d+")


def shape(command: str) -> str:
    """A command with its ids blanked: ``ZRANGE prefix:group:chat.user.* 0 -1``."""
    words = command.replace('"', "").split(" ")
    name = words[0].upper()
    if name in ("EVAL", "EVALSHA"):
        for label, phrase in SCRIPTS:
            if phrase in command:
                return f"{name} [{label}]"
        return f"{name} [script {words[1][:8] if name == 'EVALSHA' else '?'}]"
    key = ID.sub("*", words[1])[:60] if len(words) > 1 else ""
    return f"{name} {key}"


def owners(stack: BenchStack, ports: set[int]) -> dict[int, str]:
    """Which process (daphne, worker, bench) holds each client port of the private Valkey."""
    import psutil

    names = {stack.web.pid: "daphne", stack.worker.pid: "worker", os.getpid(): "bench"}
    found: dict[int, str] = {}
    for pid, name in names.items():
        for conn in psutil.Process(pid).net_connections(kind="tcp"):
            if conn.raddr and conn.raddr.port == stack.redis_port and conn.laddr.port in ports:
                found[conn.laddr.port] = name
    return found


def breakdown(stack: BenchStack, entries: list[tuple[int, str]], turns: int) -> None:
    who = owners(stack, {port for port, _ in entries})
    counted: Counter[str] = Counter(f"{who.get(port, '?'):<6} {shape(cmd)}" for port, cmd in entries)
    for line, count in counted.most_common(30):
        print(f"    {count / turns:6.2f}  {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--turns", type=int, default=40, help="turns per case")
    parser.add_argument("--concurrency", type=int, default=4, help="users sending at once")
    parser.add_argument("--chunk-delay", type=float, default=0.02, help="seconds between streamed chunks")
    parser.add_argument("--idle", type=float, default=15.0, help="seconds of idle measurement")
    parser.add_argument("--cases", default="rest-1,rest-12,ws-1,ws-12")
    parser.add_argument("--breakdown", action="store_true", help="MONITOR one extra ws-12 and rest-12 run")
    args = parser.parse_args()
    if args.turns < args.concurrency or args.concurrency < 1:
        parser.error("--turns must be at least --concurrency, which must be at least 1")

    stack = BenchStack(concurrency=8)
    try:
        stack.up()
        stack.llm.chunk_delay = args.chunk_delay
        from conversations.chat_tokens import chat_token_create
        from conversations.services import api_key_create

        _, api_key = api_key_create(name="bench-traffic")
        users = [f"traffic-{n}" for n in range(args.concurrency)]
        tokens = [chat_token_create(external_id=u) for u in users]
        pids = {"daphne": stack.web.pid, "worker": stack.worker.pid, "valkey": stack.valkey_pid}

        def turns_of(kind: str, count: int) -> None:
            if kind == "rest":
                run = rest_turns(stack.base, api_key, users, count, args.concurrency)
            else:
                run = ws_turns(stack.base, tokens, count, args.concurrency)
            asyncio.run(asyncio.wait_for(run, timeout=120 + 5 * count))  # a stuck turn fails the bench

        stack.llm.responder = reply_of(12)
        turns_of("rest", args.concurrency * 2)  # warm up
        turns_of("ws", args.concurrency)
        idle_s, idle_calls, idle_cpu = measure(stack, pids, lambda: time.sleep(args.idle))
        busy0 = machine_busy()
        results = []
        for case in args.cases.split(","):
            kind, chunks = case.split("-")
            stack.llm.responder = reply_of(int(chunks))
            seconds, calls, cpu = measure(stack, pids, lambda: turns_of(kind, args.turns))  # noqa: B023
            turns = args.turns // args.concurrency * args.concurrency
            share = seconds / idle_s
            net_calls = {k: v - idle_calls.get(k, 0) * share for k, v in calls.items()}
            net_cpu = {k: v - idle_cpu[k] * share for k, v in cpu.items()}
            results.append(Case(case, turns, seconds, net_calls, net_cpu))
        busy1 = machine_busy()
        load = (busy1[0] - busy0[0]) / max(busy1[1] - busy0[1], 1) * os.cpu_count()
        print(
            f"private stack, worker threads 8, {args.concurrency} users at once, chunk delay {args.chunk_delay}s;"
            f" machine busy {load:.2f} cores on average (all processes); idle: "
            f"{sum(idle_calls.values()) / idle_s:.1f} Valkey commands/s, CPU "
            + ", ".join(f"{k} {v / idle_s * 1000:.1f} ms/s" for k, v in idle_cpu.items())
        )
        for r in results:
            total = sum(r.calls.values()) / r.turns
            top = sorted(r.calls.items(), key=lambda kv: -kv[1])[:9]
            print(
                f"{r.name:<8} {r.turns} turns in {r.seconds:5.1f} s: {total:6.1f} Valkey commands/turn"
                f" [{' '.join(f'{k}={v / r.turns:.1f}' for k, v in top)}]"
            )
            cpu = " ".join(f"{k} {v / r.turns * 1000:5.1f}" for k, v in r.cpu.items())
            print(f"         CPU ms/turn: {cpu}  (sum {sum(r.cpu.values()) / r.turns * 1000:5.1f})")
        by_name = {r.name: r for r in results}
        for kind in ("rest", "ws"):
            one, twelve = by_name.get(f"{kind}-1"), by_name.get(f"{kind}-12")
            if one and twelve:
                diff = " ".join(
                    f"{k} {(twelve.cpu[k] / twelve.turns - one.cpu[k] / one.turns) * 1000:+.1f}"
                    for k in one.cpu
                )
                print(f"{kind}: 12 chunks - 1 chunk, CPU ms/turn: {diff}")
        if args.breakdown:
            for kind in ("rest", "ws"):
                stack.llm.responder = reply_of(12)
                monitor = Monitor(stack)
                monitor.start()
                time.sleep(0.5)
                began = len(monitor.entries)
                turns_of(kind, 8)
                entries = monitor.entries[began:]
                monitor.stop_at = time.time()
                turns = 8 // args.concurrency * args.concurrency
                print(f"{kind}-12: top-level commands per turn by sender (MONITOR; scripts' own not shown):")
                breakdown(stack, entries, turns)
    finally:
        stack.stop()


if __name__ == "__main__":
    main()
