"""The production path under load: N users over REST or WebSocket, through daphne and a Celery worker.

Starts the stack as ``manage.py agentflow_run`` does (bench/stack.py: daphne, a Celery worker with the
product's default concurrency, the fake Messages API in its own process answering after
--llm-latency seconds, and a Valkey of the bench's own), then has every user send --messages
messages, each --think seconds after the previous reply (closed loop), and prints:

* turns ok / failed / timed out, with the kinds of failure; turns/s;
* latency (message sent -> reply received) and overhead (latency - the LLM's latency) p50/p95/p99;
* the machine's CPU busy % over the steady part (10 % to 90 % of the turns answered: everyone's
  work on the machine, so the load average is printed beside it);
* CPU ms per turn of daphne, the worker, PostgreSQL (postmaster and backends), Valkey, the fake LLM
  and their sum (the driver, this process, apart); database transactions and rows per turn;
* a check in the database that every message sent (each has a unique client_message_id) is stored
  once and got exactly one reply, or was handed to a human (the bot is then silent, by design).
* with --trace (WebSocket), each hop of every turn joined per message (``AGENTFLOW_HOP_TRACE``,
  ``agentflow.hoptrace``): mean, p50, p95, and the mean over the turns at or over the overhead p95.
* with --steps, the workers' CPU per turn step by step (bench/worker_steps.py, loaded into each
  worker: the thread CPU of each step, Celery's tracer, consumer and acknowledgement included).

The issue's loads (``--load``, other flags override its values):

    saturate   500 users, no think time, 6 messages each, REST      (run again with --transport ws)
    chat500    500 users, 10 s think time, 6 messages each, WebSocket
    chat2000   2,000 users, 30 s think time, 3 messages each, WebSocket

    python bench/production_load.py --load saturate [--transport rest|ws] [--users N] [--messages M]
        [--think S] [--window S] [--llm-latency 1.0] [--concurrency C] [--timeout 150]

With think time, first messages spread over --window seconds (default: the think time), so that
users arrive as they would. One LLM call a turn: the LLM judgements of thread and intent are off
(AGENT_* variables) and so are the background memory jobs unless --background-jobs. Uses the
configured database (embedded by default); its users are named <tag>-* and erased at the end.
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
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import stack  # noqa: E402  (bench/stack.py)
from stack import MESSAGES, pct  # noqa: E402

stack.production_settings()
os.environ.setdefault("AGENT_SESSION_LLM_THREAD_JUDGEMENT", "false")
os.environ.setdefault("AGENT_CONFIDENCE_LLM_INTENT_JUDGEMENT", "false")

LOADS = {
    "saturate": {"users": 500, "think": 0.0, "messages": 6, "transport": "rest"},
    "chat500": {"users": 500, "think": 10.0, "messages": 6, "transport": "ws"},
    "chat2000": {"users": 2000, "think": 30.0, "messages": 3, "transport": "ws"},
}
HANDSHAKE_SECONDS = 60  # a client gives up on a handshake after this, then retries with backoff


@dataclass
class Results:
    latency: list[float] = field(default_factory=list)  # ms, LLM-answered turns
    worker_ms: list[float] = field(default_factory=list)  # the turn's own time in the worker (latency_ms)
    done_at: list[float] = field(default_factory=list)  # perf_counter of every answered turn
    ok = 0
    polled = 0  # REST: answered 202 (the wait ran out), then by sending the message again
    other: dict[str, int] = field(default_factory=dict)  # answered without the LLM, by handled_by
    failed: dict[str, int] = field(default_factory=dict)
    timed_out: dict[str, int] = field(default_factory=dict)
    sent: set[str] = field(default_factory=set)  # client_message_ids
    retries = 0  # WebSocket handshakes retried
    hops: dict[str, dict[str, float]] = field(default_factory=dict)  # --trace: client_message_id -> hop times

    def fail(self, kind: str) -> None:
        self.failed[kind] = self.failed.get(kind, 0) + 1

    def timeout(self, kind: str) -> None:
        self.timed_out[kind] = self.timed_out.get(kind, 0) + 1

    def answered(self, body: dict, sent: float, *, polled: bool = False) -> None:
        now = time.perf_counter()
        self.ok += 1
        self.polled += polled
        self.done_at.append(now)
        handled = body.get("handled_by") or "none"
        if handled != "llm":
            self.other[handled] = self.other.get(handled, 0) + 1
        else:
            self.latency.append((now - sent) * 1000)
        if body.get("latency_ms") is not None:
            self.worker_ms.append(body["latency_ms"])


# --- Users -----------------------------------------------------------------------------------------


def user_message(user: str, n: int, res: Results) -> tuple[str, str]:
    """Message ``n`` of ``user``: its unique marker (the client_message_id and the database check's key,
    counted as sent) and its text."""
    marker = f"{user}-m{n}"
    res.sent.add(marker)
    return marker, f"{MESSAGES[(n + len(user)) % len(MESSAGES)]} [{marker}]"


async def rest_user(session, args, base: str, key: str, user: str, first_at: float, res: Results) -> None:
    import aiohttp

    headers = {"X-API-Key": key}
    await asyncio.sleep(first_at)
    for n in range(args.messages):
        marker, text = user_message(user, n, res)
        sent = time.perf_counter()
        deadline = sent + args.timeout
        try:
            polled = False
            while True:
                # A 202 (the REST wait ran out) is followed by the documented resend: the same
                # client_message_id returns the same turn and waits for it again.
                asked = time.perf_counter()
                async with session.post(
                    f"{base}/api/users/{user}/messages",
                    json={"message": text, "client_message_id": marker},
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=max(1.0, deadline - time.perf_counter())),
                ) as response:
                    status, body = response.status, await response.json(content_type=None)
                if status != 202 or time.perf_counter() >= deadline:
                    break
                polled = True
                if time.perf_counter() - asked < 1.0:  # answered without waiting: do not spin
                    await asyncio.sleep(1.0)
            if status == 200 and body.get("status") == "done":
                res.answered(body, sent, polled=polled)
            elif status == 202:
                res.timeout(f"still {body.get('status')} after {args.timeout:.0f} s (sent again on each 202)")
            else:
                code = body.get("code") or body.get("error") or body.get("status")
                res.fail(f"HTTP {status} {str(code)[:60]}")
        except TimeoutError:
            res.timeout(f"no HTTP answer in {args.timeout:.0f} s")
        except (aiohttp.ClientError, OSError) as exc:
            res.fail(f"{type(exc).__name__}: {str(exc)[:70]}")
        except ValueError as exc:  # not JSON
            res.fail(f"bad body: {str(exc)[:60]}")
        if n + 1 < args.messages:
            await asyncio.sleep(args.think)


async def ws_user(
    session, args, base: str, token: str, user: str, first_at: float, res: Results, gate
) -> None:
    import aiohttp

    connected, start, count = gate
    url = f"{base.replace('http://', 'ws://')}/ws/chat/?token={token}"
    ws, last = None, ""
    for attempt in range(5):  # as the widget: a refused handshake is retried with backoff
        try:
            ws = await asyncio.wait_for(
                session.ws_connect(url, headers={"Origin": base}, heartbeat=None, max_msg_size=0),
                HANDSHAKE_SECONDS,
            )
            break
        except (aiohttp.ClientError, OSError) as exc:  # TimeoutError included
            res.retries += 1
            last = f"connect: {type(exc).__name__}: {str(exc)[:70]}"
            await asyncio.sleep(0.5 * 2**attempt * random.uniform(0.75, 1.25))
    frames: asyncio.Queue = asyncio.Queue()
    reader = None
    try:
        if ws is None:
            for n in range(args.messages):
                res.sent.add(f"{user}-m{n}")  # never sent, but counted as failed turns
                res.fail(last)
            return
        reader = asyncio.create_task(_read(ws, frames))
        ready = json.loads((await asyncio.wait_for(frames.get(), 60)).data)
        if ready.get("type") != "ready":
            res.fail(f"handshake: {ready.get('code', ready.get('type'))}")
            return
    finally:
        count[0] += 1
        if count[0] == args.users:
            connected.set()
    try:
        await start.wait()
        await asyncio.sleep(first_at)
        for n in range(args.messages):
            marker, text = user_message(user, n, res)
            sent = time.perf_counter()
            res.hops[marker] = {"c_send": time.time()}
            await ws.send_str(json.dumps({"type": "message", "client_message_id": marker, "message": text}))
            message_id = None
            deadline = sent + args.timeout
            while True:
                remaining = deadline - time.perf_counter()
                if remaining <= 0:
                    res.timeout(f"no turn frame in {args.timeout:.0f} s")
                    break
                try:
                    frame = await asyncio.wait_for(frames.get(), remaining)
                except TimeoutError:
                    continue
                if frame.type != aiohttp.WSMsgType.TEXT:
                    res.fail(f"socket {frame.type.name} (code {ws.close_code})")
                    return
                body = json.loads(frame.data)
                kind = body.get("type")
                if kind == "ack" and body.get("client_message_id") == marker:
                    message_id = body["message_id"]
                    res.hops[marker]["id"] = message_id  # type: ignore[assignment]
                elif kind == "turn" and message_id is not None and body.get("message_id") == message_id:
                    res.hops[marker]["c_turn"] = time.time()
                    if body.get("status") == "done":
                        res.answered(body, sent)
                    else:
                        res.fail(f"turn {body.get('status')}: {body.get('error') or ''}"[:70])
                    break
                elif kind == "error":
                    if body.get("client_message_id") == marker or (
                        message_id is not None and body.get("message_id") == message_id
                    ):
                        res.fail(f"error frame: {body.get('code')}")
                        break
            if n + 1 < args.messages:
                await asyncio.sleep(args.think)
    except (aiohttp.ClientError, OSError) as exc:
        res.fail(f"socket: {type(exc).__name__}")
    finally:
        if reader is not None:
            reader.cancel()
        if ws is not None:
            await ws.close()


async def _read(ws, frames: asyncio.Queue) -> None:
    """Always reading, as a browser does (aiohttp answers the server's pings only inside receive())."""
    import aiohttp

    while True:
        frame = await ws.receive()
        await frames.put(frame)
        if frame.type != aiohttp.WSMsgType.TEXT:
            return


# --- Measuring -------------------------------------------------------------------------------------


class Meter:
    """Samples the machine's CPU and the processes' CPU once a second while the load runs."""

    def __init__(self, pids: dict[str, int], pg_root: int | None) -> None:
        self.pids = pids
        self.pg = stack.ProcessTreeCpu(pg_root) if pg_root else None
        self.samples: list[tuple[float, float, float]] = []  # (perf_counter, busy s, total s)
        self.pg_samples: list[tuple[float, float]] = []  # (perf_counter, PostgreSQL's CPU s so far)
        self.cpu0: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def start(self) -> None:
        self.cpu0 = {name: stack.cpu_seconds(pid) for name, pid in self.pids.items()}
        self.cpu0["driver"] = stack.cpu_seconds(os.getpid())
        if self.pg:
            self.pg.start()
        self.sample()

    def sample(self) -> None:
        self.samples.append((time.perf_counter(), *stack.machine_cpu()))
        if self.pg:
            self.pg.sample()
            self.pg_samples.append((self.samples[-1][0], self.pg.used()))

    def pg_between(self, t0: float, t1: float) -> tuple[float, float, float] | None:
        """PostgreSQL's CPU seconds between the samples nearest inside [t0, t1], and those samples' times."""
        inside = [s for s in self.pg_samples if t0 <= s[0] <= t1]
        if len(inside) < 2:
            return None
        return inside[-1][1] - inside[0][1], inside[0][0], inside[-1][0]

    def stop(self) -> None:
        self.sample()
        self.cpu = {name: stack.cpu_seconds(pid) - self.cpu0[name] for name, pid in self.pids.items()}
        self.cpu["driver"] = stack.cpu_seconds(os.getpid()) - self.cpu0["driver"]
        if self.pg:
            self.cpu["PostgreSQL"] = self.pg.used()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            self.sample()

    def busy_between(self, t0: float, t1: float) -> float:
        inside = [s for s in self.samples if t0 <= s[0] <= t1] or self.samples
        first, last = inside[0], inside[-1]
        if last[2] - first[2] <= 0:
            first, last = self.samples[0], self.samples[-1]
        return (last[1] - first[1]) / max(last[2] - first[2], 1e-9) * 100


def db_counters() -> dict[str, int]:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_stat_clear_snapshot()")
        cursor.execute(
            "SELECT xact_commit + xact_rollback, tup_returned, tup_fetched, tup_inserted, tup_updated,"
            " tup_deleted FROM pg_stat_database WHERE datname = current_database()"
        )
        row = cursor.fetchone()
    return dict(
        zip(("transactions", "returned", "fetched", "inserted", "updated", "deleted"), row, strict=True)
    )


def pg_statements_reset() -> None:
    """Empty ``pg_stat_statements`` (the server must preload it: see --pg-statements)."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries'")
        if "pg_stat_statements" not in cursor.fetchone()[0]:
            raise SystemExit(
                "--pg-statements: the server does not preload pg_stat_statements; run, then restart it:"
                " ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements';"
                " ALTER SYSTEM SET pg_stat_statements.track = 'all';"
                " ALTER SYSTEM SET pg_stat_statements.track_planning = on"
            )
        cursor.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        cursor.execute("SELECT pg_stat_statements_reset()")


def pg_statements_report(turns: int, top: int) -> list[str]:
    """The statements of the load (``pg_stat_statements``), per turn, the most server time first."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT calls, plans, rows, total_exec_time, total_plan_time, shared_blks_hit + shared_blks_read,"
            " wal_records, jit_functions, jit_generation_time + jit_inlining_time + jit_optimization_time"
            " + jit_emission_time, toplevel, query FROM pg_stat_statements"
            " WHERE query NOT LIKE '%%pg_stat_%%' ORDER BY total_exec_time + total_plan_time DESC"
        )
        rows = cursor.fetchall()
    t = max(turns, 1)
    calls = sum(r[0] for r in rows if r[9])
    nested = sum(r[0] for r in rows if not r[9])
    exec_ms = sum(r[3] for r in rows if r[9])
    plan_ms = sum(r[4] for r in rows if r[9])
    jit = sum(r[8] for r in rows)
    lines = [
        f"pg_stat_statements per turn: {calls / t:.1f} top-level statements ({nested / t:.1f} nested: foreign-key"
        f" checks, functions), execution {exec_ms / t:.3f} ms, planning {plan_ms / t:.3f} ms, JIT {jit / t:.3f} ms",
        "  calls/turn plans/turn rows/call exec ms/turn plan ms/turn blks/call wal/call  statement",
    ]
    for calls_, plans, nrows, exec_, plan, blks, wal, _, _, toplevel, query in rows[:top]:
        c = max(calls_, 1)
        lines.append(
            f"  {calls_ / t:10.2f} {plans / t:10.2f} {nrows / c:8.1f} {exec_ / t:12.4f} {plan / t:12.4f}"
            f" {blks / c:8.1f} {wal / c:8.1f}  {'' if toplevel else '(nested) '}{' '.join(query.split())[:150]}"
        )
    return lines


def postmaster_pid() -> int | None:
    """The local PostgreSQL's postmaster (the parent of this connection's backend), if visible here."""
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        backend = cursor.fetchone()[0]
    try:
        return int(Path(f"/proc/{backend}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def verify(prefix: str, sent: set[str]) -> list[str]:
    """Every message sent is stored once and has exactly one reply, or was handed to a human: the
    database's word."""
    from django.db.models import Count

    from conversations.models import Message

    rows = list(
        Message.objects.filter(user__external_id__startswith=prefix, role=Message.Role.USER).values_list(
            "client_message_id", "status", "reply__id", "handled_by"
        )
    )
    stored = {marker for marker, _, _, _ in rows}
    by_status: dict[str, int] = {}
    no_reply = handed_over = 0
    for _, status, reply, handled_by in rows:
        by_status[status] = by_status.get(status, 0) + 1
        # Handed to a human (below its intent's threshold, or a hand-off intent): the bot stays silent.
        handed_over += reply is None and status == Message.Status.DONE and handled_by == "human"
        no_reply += reply is None and not (status == Message.Status.DONE and handled_by == "human")
    duplicates = (
        Message.objects.filter(user__external_id__startswith=prefix, role=Message.Role.USER)
        .values("user_id", "client_message_id")
        .annotate(n=Count("id"))
        .filter(n__gt=1)
        .count()
    )
    replies = Message.objects.filter(user__external_id__startswith=prefix, role=Message.Role.ASSISTANT)
    unlinked = replies.filter(reply_to__isnull=True).count()
    lines = [
        f"database check: {len(sent)} messages sent, {len(rows)} stored ({len(sent - stored)} missing,"
        f" {duplicates} stored twice), by status {by_status}",
        f"  replies: {len(rows) - no_reply - handed_over} messages with exactly one reply, {handed_over} handed"
        f" to a human (no bot reply, by design), {no_reply} with none;"
        f" {replies.count()} assistant messages in all ({unlinked} not linked to a message)",
    ]
    ok = not (sent - stored) and not duplicates and not no_reply and not unlinked and len(rows) == len(sent)
    lines.append(
        "  => every message sent got exactly one reply or a human"
        if ok
        else "  => NOT every message got one reply"
    )
    return lines


# --- Per-hop trace (--trace) -------------------------------------------------------------------------

HOPS = [  # (name, from, to): consecutive timestamps of a WebSocket turn (agentflow.hoptrace)
    ("client -> stored (daphne: frame, read, INSERT)", "c_send", "w_stored"),
    ("publish the task", "w_stored", "w_queued"),
    ("waiting in Redis (queued -> worker receives)", "w_queued", "k_recv"),
    ("received -> a thread starts it", "k_recv", "k_start"),
    ("start -> typing sent", "k_start", "k_typing"),
    ("the turn (prepare, LLM, finish)", "k_typing", "k_turned"),
    ("thread change read", "k_turned", "k_shown"),
    ("announce (group_send)", "k_shown", "k_announced"),
    ("announced -> daphne pops it", "k_announced", "w_relay"),
    ("popped -> client (daphne's loop, the frame)", "w_relay", "c_turn"),
]


def trace_report(folder: Path, res: Results, llm_ms: float) -> None:
    """Join the processes' hop lines with the client's, per message; print each hop's share."""
    marks: dict[str, dict[str, float]] = {}
    for path in folder.glob("*.log"):
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3:
                marks.setdefault(parts[0], {}).setdefault(parts[1], float(parts[2]))
    rows = []
    for marker, hops in res.hops.items():
        message_id = hops.get("id")
        if "c_turn" not in hops or message_id is None:
            continue
        joined = {**marks.get(marker, {}), **marks.get(str(message_id), {}), **hops}
        if all(a in joined and b in joined for _, a, b in HOPS):
            rows.append(joined)
    if not rows:
        print("trace: no turn with every hop")
        return
    over = [(r["c_turn"] - r["c_send"]) * 1000 - llm_ms for r in rows]
    cut = pct(over, 95)
    tail = [r for r, o in zip(rows, over, strict=True) if o >= cut]
    print(
        f"per-hop trace of {len(rows)} turns (ms; tail = the {len(tail)} turns at or over the overhead p95):"
    )
    print(f"  {'hop':<46} {'mean':>7} {'p50':>7} {'p95':>7} {'tail mean':>9}")
    for name, a, b in HOPS:
        values = [(r[b] - r[a]) * 1000 for r in rows]
        tail_mean = statistics.mean((r[b] - r[a]) * 1000 for r in tail)
        print(
            f"  {name:<46} {statistics.mean(values):7.1f} {pct(values, 50):7.1f} {pct(values, 95):7.1f}"
            f" {tail_mean:9.1f}"
        )
    print(
        f"  {'overhead (latency - LLM)':<46} {statistics.mean(over):7.1f} {pct(over, 50):7.1f} {cut:7.1f}"
        f" {statistics.mean(o for o in over if o >= cut):9.1f}"
    )


# --- The run ---------------------------------------------------------------------------------------


async def drive(args, stk: stack.Stack, credentials: list[str], users: list[str], pg_root: int | None):
    import aiohttp

    res = Results()
    rng = random.Random(7)
    pids = stk.pids()
    if args.valkey_pid:
        pids["Valkey"] = args.valkey_pid
    meter = Meter(pids, pg_root)
    connector = aiohttp.TCPConnector(limit=0, force_close=False)
    connected, start, count = asyncio.Event(), asyncio.Event(), [0]
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks = []
        if args.transport == "ws":
            began = time.perf_counter()
            for i, (token, user) in enumerate(zip(credentials, users, strict=True)):
                first_at = rng.uniform(0, args.window)
                gate = (connected, start, count)
                tasks.append(
                    asyncio.create_task(ws_user(session, args, stk.base, token, user, first_at, res, gate))
                )
                if i % 20 == 19:
                    await asyncio.sleep(0.1)  # a ramp (200 handshakes/s), not a thundering herd
            await asyncio.wait_for(connected.wait(), timeout=600)
            print(f"{args.users} WebSockets connected in {time.perf_counter() - began:.1f} s", flush=True)
            await asyncio.sleep(2)
        db0 = await asyncio.to_thread(db_counters)
        if args.pg_statements:
            await asyncio.to_thread(pg_statements_reset)
        meter.start()
        sampler = asyncio.create_task(meter.run())
        load_began = time.perf_counter()
        if args.transport == "ws":
            start.set()
        else:
            for token, user in zip(credentials, users, strict=True):
                first_at = rng.uniform(0, args.window)
                tasks.append(
                    asyncio.create_task(rest_user(session, args, stk.base, token, user, first_at, res))
                )
        await asyncio.gather(*tasks)
        load_s = time.perf_counter() - load_began
        sampler.cancel()
        meter.stop()
        db1 = await asyncio.to_thread(db_counters)
    return res, meter, load_began, load_s, {k: db1[k] - db0[k] for k in db0}


def report(args, res: Results, meter: Meter, load_began: float, load_s: float, db: dict[str, int]) -> None:
    total = len(res.sent)
    failed, timed_out = sum(res.failed.values()), sum(res.timed_out.values())
    print(
        f"\nturns: {res.ok} ok, {failed} failed, {timed_out} timed out, of {total} sent"
        f" ({res.ok / max(load_s, 1e-9):.1f} turns/s over the {load_s:.1f} s of the load)"
    )
    if res.polled:
        print(
            f"  of the ok turns, {res.polled} first answered 202 (the REST wait ran out) and were sent again"
            " (same client_message_id: the same turn, waited for again)"
        )
    if res.other:
        print(f"  answered without the LLM (not in the latency figures): {res.other}")
    for kind, n in sorted(res.failed.items(), key=lambda kv: -kv[1]):
        print(f"  failed    {n:6d}  {kind}")
    for kind, n in sorted(res.timed_out.items(), key=lambda kv: -kv[1]):
        print(f"  timed out {n:6d}  {kind}")
    if res.retries:
        print(f"  WebSocket handshakes retried: {res.retries}")
    llm_ms = args.llm_latency * 1000
    if res.latency:
        over = [v - llm_ms for v in res.latency]
        print(
            f"latency   p50 {pct(res.latency, 50):8.1f}  p95 {pct(res.latency, 95):8.1f}"
            f"  p99 {pct(res.latency, 99):8.1f}  max {max(res.latency):8.1f} ms"
        )
        print(
            f"overhead  p50 {pct(over, 50):8.1f}  p95 {pct(over, 95):8.1f}  p99 {pct(over, 99):8.1f}"
            f"  mean {statistics.mean(over):8.1f} ms  (latency - the {llm_ms:.0f} ms LLM)"
        )
    if res.worker_ms:
        mean_s = statistics.mean(res.worker_ms) / 1000
        print(
            f"in the worker: a turn took p50 {pct(res.worker_ms, 50):.0f} ms, mean {mean_s * 1000:.0f} ms;"
            f" {args.concurrency_used} threads can finish at most {args.concurrency_used / mean_s:.1f} turns/s"
            " (the rest of the latency is waiting in the queue and the transport)"
        )
    done = sorted(res.done_at)
    if len(done) >= 10:
        t0, t1 = done[len(done) // 10], done[len(done) * 9 // 10]
        steady_rate = (len(done) * 8 // 10) / max(t1 - t0, 1e-9)
        print(
            f"steady part ({t0 - load_began:.1f}-{t1 - load_began:.1f} s, 10-90 % of the turns answered):"
            f" {steady_rate:.1f} turns/s, machine CPU busy {meter.busy_between(t0, t1):.0f} %"
            f" of {os.cpu_count()} cores (everyone's work); load average now {stack.load_average()}"
        )
        steady_pg = meter.pg_between(t0, t1)
        if steady_pg:
            seconds, a, b = steady_pg
            answered = sum(1 for t in done if a < t <= b)
            print(
                f"PostgreSQL CPU per turn in the steady part: {seconds * 1000 / max(answered, 1):.2f} ms"
                f" ({answered} turns answered in those {b - a:.1f} s; the whole load's figure below also"
                " holds the new connections' first statements)"
            )
    turns = max(res.ok, 1)
    print(f"CPU per answered turn (whole load, {load_s:.1f} s):")
    product = 0.0
    for name, seconds in meter.cpu.items():
        if name == "driver":
            continue
        product += seconds
        print(
            f"  {name:<11} {seconds * 1000 / turns:7.1f} ms  ({seconds / max(load_s, 1e-9) * 100:4.0f} % of one core)"
        )
    print(f"  {'total':<11} {product * 1000 / turns:7.1f} ms  (the stack; without the driver below)")
    driver = meter.cpu["driver"]
    print(f"  {'driver':<11} {driver * 1000 / turns:7.1f} ms  (this process: the simulated users)")
    if meter.pg:
        print(
            "  PostgreSQL by process: "
            + ", ".join(
                f"{kind} {seconds * 1000 / turns:.2f} ms ({count})"
                for kind, (seconds, count) in meter.pg.by_kind().items()
                if seconds > 0
            )
        )
    if db:
        print(
            "database per turn: "
            + ", ".join(f"{v / turns:.1f} {k}" for k, v in db.items() if k != "deleted")
            + " (pg_stat_database: transactions and rows, the whole database; statements: bench/turn_sql.py)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--load", choices=sorted(LOADS), default="saturate", help="the issue's load (default saturate)"
    )
    parser.add_argument("--transport", choices=["rest", "ws"])
    parser.add_argument("--users", type=int)
    parser.add_argument("--messages", type=int, help="messages per user")
    parser.add_argument("--think", type=float, help="seconds between a reply and the user's next message")
    parser.add_argument(
        "--window", type=float, help="seconds over which first messages spread (default: think)"
    )
    parser.add_argument("--llm-latency", type=float, default=1.0, help="seconds the fake LLM waits (1.0)")
    parser.add_argument(
        "--llm-chunk-delay",
        type=float,
        default=0.0,
        help="seconds between the words of a streamed reply (0: the whole reply at once)",
    )
    parser.add_argument("--concurrency", type=int, help="Celery worker threads (default: the product's)")
    parser.add_argument(
        "--workers",
        type=int,
        help="Celery worker processes, --concurrency threads each (default: the product's, one per core up to 4)",
    )
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds a reply may take (150)")
    parser.add_argument("--background-jobs", action="store_true", help="queue the memory jobs after turns")
    parser.add_argument(
        "--redis",
        choices=["own", "configured"],
        default="own",
        help="own: a Valkey of the bench's own, its CPU measured (default); configured: REDIS_URL/the product's choice",
    )
    parser.add_argument("--log-level", default="WARNING", help="the worker's log level")
    parser.add_argument(
        "--steps",
        action="store_true",
        help="print the workers' CPU per turn step by step (bench/worker_steps.py: thread CPU per step)",
    )
    parser.add_argument(
        "--trace", action="store_true", help="WebSocket: time each hop of every turn (AGENTFLOW_HOP_TRACE)"
    )
    parser.add_argument(
        "--pg-statements",
        type=int,
        default=0,
        metavar="N",
        help="print the N statements with the most server time over the load (pg_stat_statements,"
        " which the server must preload)",
    )
    args = parser.parse_args()
    for key, value in LOADS[args.load].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.window is None:
        args.window = args.think if args.think > 0 else 0.0
    if args.users < 1 or args.messages < 1 or args.think < 0 or args.window < 0 or args.timeout <= 0:
        parser.error("--users and --messages must be at least 1; --think, --window not negative")

    limit = stack.raise_open_files(max(65536, args.users * 4 + 1024))
    valkey = None
    args.valkey_pid = None
    if args.redis == "own":
        valkey = stack.OwnValkey()
        os.environ["REDIS_URL"] = valkey.start()
        args.valkey_pid = valkey.process.pid

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from conversations.chat_tokens import chat_token_create
    from conversations.models import ApiKey, EndUser
    from conversations.services import api_key_create
    from memory.privacy import user_erase

    call_command("migrate", verbosity=0)
    tag = f"prodload-{uuid.uuid4().hex[:6]}"
    trace_dir = stack.LOGS / f"{tag}-trace"
    if args.trace:
        trace_dir.mkdir(parents=True)
    steps_dir = stack.LOGS / f"{tag}-steps"
    if args.steps:
        steps_dir.mkdir(parents=True)
    stk = stack.Stack(
        tag=tag,
        llm_latency=args.llm_latency,
        llm_chunk_delay=args.llm_chunk_delay,
        concurrency=args.concurrency,
        workers=args.workers or 0,
        log_level=args.log_level,
        env={
            "AGENTFLOW_BACKGROUND_JOBS": "true" if args.background_jobs else "false",
            "DJANGO_DEBUG": "false",
            **({"AGENTFLOW_HOP_TRACE": str(trace_dir)} if args.trace else {}),
            **(
                {
                    "AGENTFLOW_BENCH_STEPS_DIR": str(steps_dir),
                    "PYTHONPATH": os.pathsep.join(
                        filter(None, [str(ROOT / "bench"), os.environ.get("PYTHONPATH")])
                    ),
                }
                if args.steps
                else {}
            ),
        },
        worker_args=["-I", "worker_steps"] if args.steps else [],
    )
    users = [f"{tag}-{i}" for i in range(args.users)]
    key_row = None
    print(
        f"load {args.load}: {args.users} users over {args.transport.upper()}, {args.messages} messages each,"
        f" think {args.think:g} s, first messages over {args.window:g} s; fake LLM {args.llm_latency * 1000:.0f} ms"
        + (f", then a word every {args.llm_chunk_delay * 1000:.0f} ms" if args.llm_chunk_delay else "")
    )
    try:
        stk.start()
        print(
            f"stack: daphne + {stk.workers} Celery worker(s) ({stk.concurrency} threads each, agentflow_run's default"
            f" {settings.CELERY_WORKER_CONCURRENCY}); daphne's DB pool {settings.DATABASES['default']['OPTIONS'].get('pool')};"
            f" channel capacity {settings.CHANNEL_LAYERS['default']['CONFIG']['capacity']}; Redis: {args.redis};"
            f" open files {limit[0]}; {os.cpu_count()} CPUs; load average {stack.load_average()}; logs {stk.logs()}",
            flush=True,
        )
        pg_root = postmaster_pid()
        args.concurrency_used = stk.concurrency * stk.workers
        if args.transport == "rest":
            key_row, plain = api_key_create(name=tag)
            credentials = [plain] * len(users)
        else:
            credentials = [chat_token_create(external_id=user) for user in users]
        # Warm up: the worker loads the embedding model and opens its connections.
        warm_args = argparse.Namespace(
            **{**vars(args), "users": 4, "messages": 1, "think": 0.0, "window": 0.5}
        )
        warm_users = [f"{tag}w-{i}" for i in range(4)]
        warm_credentials = (
            [credentials[0]] * 4
            if args.transport == "rest"
            else [chat_token_create(external_id=u) for u in warm_users]
        )
        print("warming up ...", flush=True)
        asyncio.run(drive(warm_args, stk, warm_credentials, warm_users, None))
        print(f"running (load average {stack.load_average()}) ...", flush=True)
        res, meter, load_began, load_s, db = asyncio.run(drive(args, stk, credentials, users, pg_root))
        report(args, res, meter, load_began, load_s, db)
        if args.pg_statements:
            for line in pg_statements_report(res.ok, args.pg_statements):
                print(line)
        exited = stk.exited()
        if args.trace:
            stk.stop()  # the processes' lines are complete
            trace_report(trace_dir, res, args.llm_latency * 1000)
        if args.steps:
            stk.stop()  # each worker writes its figures as it stops
            import worker_steps

            for line in worker_steps.report(steps_dir):
                print(line)
        for line in verify(f"{tag}-", res.sent):
            print(line)
        if exited:
            print(f"EXITED during the run: {exited}")
    finally:
        stk.stop()
        for user in EndUser.objects.filter(external_id__startswith=tag):
            user_erase(user=user)
        if key_row is not None:
            ApiKey.objects.filter(pk=key_row.pk).delete()
        if valkey is not None:
            valkey.stop()


if __name__ == "__main__":
    main()
