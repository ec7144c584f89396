"""Live chat under load: N concurrent WebSocket users against the real web server and worker.

Starts the fake Messages API (its own process, --llm-latency seconds before each reply, streamed),
daphne and a Celery worker (threads pool) exactly as ``manage.py agentflow_run`` does, then:

1. connects N users (chat tokens signed like the REST API's) and holds the connections open;
2. has every user send --messages messages, the first at a random moment within --window seconds
   and each next one --think seconds after the previous reply;
3. measures, per message, the time to the first streamed delta and to the final ``turn`` frame,
   and overhead = time to the final frame - the LLM latency;
4. reads the resident memory (VmRSS) of the server and the worker before connecting, with all
   users connected and idle, and after the load.

    python bench/ws_load.py [--users 1000] [--window 60] [--messages 1] [--llm-latency 1.0]

The LLM judgements of thread and intent are turned off (AGENT_* variables) so that each turn makes
exactly one LLM call and the overhead is AgentFlow's own. Uses the configured database (embedded
by default) and Redis; its users are named ws-load-* and erased at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
# The servers run with DJANGO_DEBUG=false, which wants a secret key.
os.environ.setdefault("DJANGO_SECRET_KEY", "bench-" + uuid.uuid4().hex * 2)
# One API key from one address: the per-key and per-IP REST limits would throttle the bench itself.
os.environ.setdefault("AGENTFLOW_RATE_API_KEY_PER_MINUTE", "0")
os.environ.setdefault("AGENTFLOW_RATE_IP_PER_MINUTE", "0")

from stack import MESSAGES, Stack, cpu_seconds, pct, raise_open_files, rss_mb  # noqa: E402  (bench/stack.py)


class Stats:
    def __init__(self) -> None:
        self.first_delta: list[float] = []
        self.final: list[float] = []
        self.errors: dict[str, int] = {}
        self.retries = 0  # handshakes refused and retried (not errors unless every retry failed)
        self.worker: list[float] = []
        self.other: dict[
            str, int
        ] = {}  # turns answered without the LLM (hand-off, handler), by handled_by  # the turn's own time in the worker, minus the LLM call

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


async def user_session(
    session,
    url: str,
    origin: str,
    stats: Stats,
    *,
    connected: asyncio.Event,
    start: asyncio.Event,
    first_at: float,
    messages: int,
    think: float,
    reply_timeout: float,
    ready_count: list[int],
    total: int,
) -> None:
    import aiohttp

    ws = None
    for attempt in range(5):  # like the widget: a refused handshake is retried with backoff
        try:
            ws = await session.ws_connect(url, headers={"Origin": origin}, heartbeat=None, max_msg_size=0)
            break
        except (aiohttp.ClientError, OSError) as exc:
            stats.retries += 1
            last = f"connect: {type(exc).__name__}: {str(exc)[:90]}"
            await asyncio.sleep(0.5 * 2**attempt * random.uniform(0.75, 1.25))
    if ws is None:
        stats.error(last)
        ready_count[0] += 1
        if ready_count[0] == total:
            connected.set()
        return
    frames: asyncio.Queue = asyncio.Queue()

    async def read() -> None:
        # Always reading, like a browser: aiohttp answers the server's pings only inside receive().
        while True:
            frame = await ws.receive()
            await frames.put(frame)
            if frame.type != aiohttp.WSMsgType.TEXT:
                return

    reader = asyncio.create_task(read())
    try:
        ready = json.loads((await asyncio.wait_for(frames.get(), 30)).data)
        if ready.get("type") != "ready":
            stats.error(f"handshake: {ready.get('code', ready.get('type'))}")
            return
        ready_count[0] += 1
        if ready_count[0] == total:
            connected.set()
        await start.wait()
        await asyncio.sleep(first_at)
        for n in range(messages):
            client_id = uuid.uuid4().hex
            sent = time.perf_counter()
            await ws.send_str(
                json.dumps(
                    {
                        "type": "message",
                        "client_message_id": client_id,
                        "message": MESSAGES[(n + int(first_at * 1000)) % len(MESSAGES)],
                    }
                )
            )
            message_id = None
            first = None
            deadline = sent + reply_timeout
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    stats.error("no reply in time")
                    break
                frame = await asyncio.wait_for(frames.get(), remaining)
                if frame.type != aiohttp.WSMsgType.TEXT:
                    stats.error(f"socket {frame.type.name}")
                    return
                body = json.loads(frame.data)
                kind = body.get("type")
                if kind == "ack" and body.get("client_message_id") == client_id:
                    message_id = body["message_id"]
                elif kind == "delta" and body.get("message_id") == message_id and first is None:
                    first = time.perf_counter()
                elif kind == "turn" and body.get("message_id") == message_id:
                    done = time.perf_counter()
                    if body.get("status") != "done":
                        stats.error(f"turn {body.get('status')}")
                    if body.get("handled_by") != "llm":  # a hand-off or a handler: no LLM call to subtract
                        stats.other[body.get("handled_by") or "none"] = (
                            stats.other.get(body.get("handled_by") or "none", 0) + 1
                        )
                        break
                    stats.final.append((done - sent) * 1000)
                    stats.first_delta.append(((first or done) - sent) * 1000)
                    if body.get("latency_ms") is not None:
                        stats.worker.append(body["latency_ms"] - (body.get("llm_latency_ms") or 0))
                    break
                elif kind == "error":
                    stats.error(f"error frame: {body.get('code')}")
                    if body.get("client_message_id") == client_id or body.get("message_id") == message_id:
                        break
            if n + 1 < messages:
                await asyncio.sleep(think)
    except TimeoutError:
        stats.error("timeout")
    except (aiohttp.ClientError, OSError) as exc:
        stats.error(f"socket: {type(exc).__name__}")
    finally:
        reader.cancel()
        await ws.close()


async def drive(args: argparse.Namespace, base: str, tokens: list[str], pids: dict[str, int]) -> None:
    import aiohttp

    stats = Stats()
    connected, start = asyncio.Event(), asyncio.Event()
    ready_count = [0]
    ws_base = base.replace("http://", "ws://")
    rng = random.Random(7)
    memory = {"idle": {name: rss_mb(pid) for name, pid in pids.items()}}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        began = time.perf_counter()
        for i, token in enumerate(tokens):
            tasks.append(
                asyncio.create_task(
                    user_session(
                        session,
                        f"{ws_base}/ws/chat/?token={token}",
                        base,
                        stats,
                        connected=connected,
                        start=start,
                        first_at=rng.uniform(0, args.window),
                        messages=args.messages,
                        think=args.think,
                        reply_timeout=args.timeout,
                        ready_count=ready_count,
                        total=len(tokens),
                    )
                )
            )
            if i % 10 == 9:
                await asyncio.sleep(0.1)  # a ramp, not a thundering herd of handshakes
        await asyncio.wait_for(connected.wait(), timeout=300)
        connect_s = time.perf_counter() - began
        await asyncio.sleep(2)  # settle
        memory["connected"] = {name: rss_mb(pid) for name, pid in pids.items()}
        cpu_before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        start.set()
        load_began = time.perf_counter()
        await asyncio.gather(*tasks)
        load_s = time.perf_counter() - load_began
        memory["after load"] = {name: rss_mb(pid) for name, pid in pids.items()}
        cpu = {name: cpu_seconds(pid) - cpu_before[name] for name, pid in pids.items()}

    llm_ms = args.llm_latency * 1000
    overhead = [v - llm_ms for v in stats.final]
    n = len(tokens)
    answered = len(stats.final) + sum(stats.other.values())
    print(
        f"users {n}: connected in {connect_s:.1f} s; {answered} of {n * args.messages} turns answered"
        f" in {load_s:.1f} s ({answered / max(load_s, 1e-9):.1f} turns/s)"
    )
    if stats.other:
        print(f"answered without the LLM (not in the latency figures): {stats.other}")
    print(f"errors: {sum(stats.errors.values())} {stats.errors or ''}; handshakes retried: {stats.retries}")
    print(
        f"time to first token  p50 {pct(stats.first_delta, 50):7.1f} ms  p95 {pct(stats.first_delta, 95):7.1f} ms"
    )
    print(f"time to final frame  p50 {pct(stats.final, 50):7.1f} ms  p95 {pct(stats.final, 95):7.1f} ms")
    if overhead:
        print(
            f"overhead over the {llm_ms:.0f} ms LLM  p50 {pct(overhead, 50):6.1f} ms  p95 {pct(overhead, 95):6.1f} ms"
            f"  mean {statistics.mean(overhead):6.1f} ms  max {max(overhead):6.1f} ms"
        )
    if stats.worker:
        print(
            f"  of which inside the worker's turn (pipeline, no LLM)  p50 {pct(stats.worker, 50):6.1f} ms"
            f"  p95 {pct(stats.worker, 95):6.1f} ms; the rest is transport and queueing"
        )
    for name in pids:
        idle, conn, after = memory["idle"][name], memory["connected"][name], memory["after load"][name]
        print(
            f"RSS {name:<7} idle {idle:6.1f} MB  with {n} connected {conn:6.1f} MB"
            f" (+{(conn - idle) / n * 100:5.2f} MB per 100 users)  after load {after:6.1f} MB"
        )
    turns = max(answered, 1)
    for name in pids:
        print(
            f"CPU {name:<7} {cpu[name]:6.1f} s during the load = {cpu[name] / turns * 1000:5.1f} ms per turn"
            f" ({cpu[name] / max(load_s, 1e-9) * 100:4.0f} % of one core)"
        )
    both = sum(memory["connected"].values()) - sum(memory["idle"].values())
    print(f"server + worker: +{both / n * 100:.2f} MB per 100 connected users")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=1000)
    parser.add_argument("--window", type=float, default=60.0, help="seconds over which first messages spread")
    parser.add_argument("--messages", type=int, default=1, help="messages per user")
    parser.add_argument(
        "--think", type=float, default=5.0, help="seconds between a reply and the next message"
    )
    parser.add_argument("--llm-latency", type=float, default=1.0, help="seconds the fake LLM waits")
    parser.add_argument("--concurrency", type=int, default=32, help="Celery worker threads")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a reply may take")
    parser.add_argument(
        "--log-level", default="WARNING", help="the worker's log level (INFO shows each task)"
    )
    args = parser.parse_args()
    if args.users < 1 or args.messages < 1 or args.window < 0:
        parser.error("--users and --messages must be at least 1 and --window not negative")

    raise_open_files()

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from conversations.chat_tokens import chat_token_create
    from conversations.models import EndUser
    from memory.privacy import user_erase

    call_command("migrate", verbosity=0)
    run = uuid.uuid4().hex[:6]
    stack = Stack(
        tag=f"ws-load-{run}",
        llm_latency=args.llm_latency,
        concurrency=args.concurrency,
        workers=1,  # one process of --concurrency threads, as this bench has always measured
        log_level=args.log_level,
        env={
            "AGENTFLOW_BACKGROUND_JOBS": "false",
            "DJANGO_DEBUG": "false",  # production settings: DEBUG keeps every query in memory and costs CPU
            "AGENT_RATE_LIMIT_MESSAGES_PER_MINUTE": "0",
            "AGENT_SESSION_LLM_THREAD_JUDGEMENT": "false",
            "AGENT_CONFIDENCE_LLM_INTENT_JUDGEMENT": "false",
        },
    )
    users = [f"ws-load-{run}-{i}" for i in range(args.users)]
    print(
        f"{args.users} users, first messages over {args.window:.0f} s, {args.messages} each; fake LLM "
        f"{args.llm_latency * 1000:.0f} ms; worker threads {args.concurrency}; {os.cpu_count()} CPUs; logs {stack.logs()}"
    )
    try:
        stack.start()
        base = stack.base
        # Warm up: the worker loads the embedding model and opens its connections.
        warm = [chat_token_create(external_id=f"ws-load-{run}-warm-{i}") for i in range(4)]
        args_warm = argparse.Namespace(**{**vars(args), "window": 0.5, "messages": 1})
        print("warming up ...")
        asyncio.run(_quiet(drive, args_warm, base, warm))
        tokens = [chat_token_create(external_id=user) for user in users]
        pids = {"server": stack.procs["daphne"].pid, "worker": stack.procs["worker"].pid}
        print(f"chat token lifetime {settings.AGENTFLOW['CHAT_TOKEN_TTL_SECONDS']} s; running ...")
        asyncio.run(drive(args, base, tokens, pids))
    finally:
        stack.stop()
        for user in EndUser.objects.filter(external_id__startswith=f"ws-load-{run}-"):
            user_erase(user=user)


async def _quiet(fn, *args) -> None:
    """Run ``fn`` with its printout dropped (the warm-up)."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        await fn(*args, {})


if __name__ == "__main__":
    main()
