"""The chaos suite: drive REST and WebSocket users while one component fails, then check the database.

    python -m tests.chaos.run [--scenario worker-kill,redis-8s] [--users 10] [--seconds 30] [--json out]

It starts its own stack (``tests.chaos.stack``: PostgreSQL, Valkey, the fake LLM, a web server and a
worker with beat, all under ``.data/chaos/``), warms it up, then runs each scenario in turn on the same
stack with users of its own. Each user sends messages carrying a unique marker, over REST (half the
users) or the WebSocket (the other half), one at a time, retrying a refused send with the same
``client_message_id`` as a real client does. Meanwhile the scenario injects its fault:

- ``worker-kill``: ``kill -9`` the worker mid-turn, start it again 5 s later.
- ``redis-8s`` / ``redis-20s``: kill Valkey (its queues are lost with it), start it again after 8 / 20 s.
- ``postgres-restart``: a fast PostgreSQL restart (every connection is cut).
- ``llm-outage``: the fake LLM answers 429 for 8 s, then 529 for 8 s, then hangs for 8 s.
- ``web-restart``: stop the web server (SIGTERM, SIGKILL after 10 s) and start it again.

After the load it waits for ``/api/health/ready``, lets the stack settle (at most 60 s of health) and
checks the database for the scenario's users: every accepted message stored once (``lost``:
accepted but not stored; ``duplicated``: a marker stored twice), answered (``done`` with one reply),
``held`` (``done`` in a thread a human holds: the LLM outage's fallback escalated it) or ``failed``
with the client told, none left ``pending``/``processing`` (``stuck``). ``recover_s`` is the
time from the component's return until the first message sent after it is answered.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

from .stack import Stack, main_guard

SCENARIOS = ["worker-kill", "redis-8s", "redis-20s", "postgres-restart", "web-restart", "llm-outage"]
SETTLE_AFTER_HEALTH = 60.0
ANSWER_TIMEOUT = 75.0  # how long a client waits for an accepted message's outcome


def _timeout(seconds: float) -> Any:
    import aiohttp

    return aiohttp.ClientTimeout(total=seconds)


TIMEOUT_10, TIMEOUT_40 = _timeout(10), _timeout(40)


@dataclass
class Sent:
    marker: str
    transport: str
    sent_at: float
    accepted: bool = False
    message_id: str | None = None
    outcome: str | None = None  # "done" / "failed" as the client learned it
    answered_at: float | None = None
    refusals: int = 0  # sends refused (component down) and retried


@dataclass
class Row:
    scenario: str
    sent: int = 0
    accepted: int = 0
    stored: int = 0
    answered: int = 0
    held: int = 0  # done without a bot reply: a human holds the thread (the LLM outage's escalation)
    failed: int = 0
    stuck: int = 0
    duplicated: int = 0
    lost: int = 0
    untold: int = 0  # failed in the database, the client never told
    recover_s: float | None = None
    refused: int = 0
    worker_alive: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (
            self.lost == 0
            and self.duplicated == 0
            and self.stuck == 0
            and self.untold == 0
            and self.recover_s is not None
            and self.recover_s <= 30
            and self.worker_alive
        )


# --- the users -----------------------------------------------------------------------------------


class Users:
    def __init__(self, stack: Stack, api_key: str, scenario: str, n: int) -> None:
        self.stack = stack
        self.api_key = api_key
        self.prefix = f"chaos-{stack.run}-{scenario}"
        self.n = n
        self.sent: list[Sent] = []
        self.stop_at = float("inf")
        self.where: dict[int, str] = {}  # what each user is doing (printed if the load overruns)

    def user(self, i: int) -> str:
        return f"{self.prefix}-u{i}"

    def text(self, marker: str) -> str:
        return f"[{marker}] Where is my order? It has not arrived yet."

    async def run(self, tokens: dict[int, str]) -> None:
        import aiohttp

        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            await asyncio.gather(
                *(
                    self.ws_user(session, i, tokens[i]) if i % 2 else self.rest_user(session, i)
                    for i in range(self.n)
                )
            )

    def _headers(self) -> dict[str, str]:
        return {"X-API-Key": self.api_key, "Content-Type": "application/json"}

    async def _poll(self, session: Any, i: int, record: Sent) -> None:
        """Ask for the outcome over REST until it is final (or the answer timeout)."""
        url = f"{self.stack.base}/api/users/{self.user(i)}/messages/{record.message_id}"
        deadline = record.sent_at + ANSWER_TIMEOUT
        while time.monotonic() < deadline:
            try:
                async with session.get(url, headers=self._headers(), timeout=TIMEOUT_10) as response:
                    if response.status == 200:
                        body = await response.json()
                        if body.get("status") in ("done", "failed"):
                            self._outcome(record, body["status"])
                            return
            except Exception:
                pass
            await asyncio.sleep(1.0)

    @staticmethod
    def _outcome(record: Sent, status: str) -> None:
        if record.outcome is None:
            record.outcome = status
            record.answered_at = time.monotonic()

    async def rest_user(self, session: Any, i: int) -> None:
        j = 0
        while time.monotonic() < self.stop_at:
            marker = f"{self.prefix}-u{i}-m{j}"
            record = Sent(marker, "rest", time.monotonic())
            self.sent.append(record)
            j += 1
            body = {"message": self.text(marker), "client_message_id": uuid.uuid4().hex}
            url = f"{self.stack.base}/api/users/{self.user(i)}/messages"
            for attempt in range(30):
                try:
                    async with session.post(
                        url, json=body, headers=self._headers(), timeout=TIMEOUT_40
                    ) as response:
                        data = await response.json(content_type=None)
                        if isinstance(data, dict) and data.get("message_id"):
                            record.accepted = True
                            record.message_id = data["message_id"]
                            if data.get("status") in ("done", "failed"):
                                self._outcome(record, data["status"])
                            break
                        record.refusals += 1
                except Exception:
                    record.refusals += 1
                if time.monotonic() > self.stop_at + 30:
                    break
                await asyncio.sleep(min(4.0, 0.5 * 1.5**attempt) * random.uniform(0.75, 1.25))
            if record.accepted and record.outcome is None:
                await self._poll(session, i, record)
            await asyncio.sleep(random.uniform(0.3, 0.8))

    async def ws_user(self, session: Any, i: int, token: str) -> None:
        import aiohttp

        url = self.stack.base.replace("http://", "ws://") + f"/ws/chat/?token={token}"
        j = 0
        pending: Sent | None = None  # sent, not yet acknowledged: send again after a reconnect
        cid = ""
        while time.monotonic() < self.stop_at or pending is not None:
            if time.monotonic() > self.stop_at + 30:
                break
            try:
                self.where[i] = "connecting"
                async with session.ws_connect(
                    url, headers={"Origin": self.stack.base}, timeout=aiohttp.ClientWSTimeout(ws_close=5)
                ) as ws:
                    self.where[i] = "handshake"
                    ready = await ws.receive_json(timeout=10)
                    if ready.get("type") != "ready":
                        raise ConnectionError(str(ready))
                    while True:
                        if pending is None:
                            if time.monotonic() >= self.stop_at:
                                return
                            marker = f"{self.prefix}-u{i}-m{j}"
                            j += 1
                            pending = Sent(marker, "ws", time.monotonic())
                            self.sent.append(pending)
                            cid = uuid.uuid4().hex
                        await ws.send_json(
                            {
                                "type": "message",
                                "client_message_id": cid,
                                "message": self.text(pending.marker),
                            }
                        )
                        record = pending
                        deadline = time.monotonic() + ANSWER_TIMEOUT
                        while record.outcome is None and time.monotonic() < deadline:
                            self.where[i] = f"waiting {record.marker} accepted={record.accepted}"
                            frame = await asyncio.wait_for(ws.receive(), deadline - time.monotonic())
                            if frame.type != aiohttp.WSMsgType.TEXT:
                                raise ConnectionError(f"socket {frame.type.name}")
                            body = json.loads(frame.data)
                            kind = body.get("type")
                            if kind == "ack" and body.get("client_message_id") == cid:
                                record.accepted, record.message_id = True, body["message_id"]
                                pending = None
                            elif kind == "turn" and body.get("message_id") == record.message_id:
                                self._outcome(record, body.get("status") or "done")
                            elif kind == "error" and body.get("code") == "unavailable":
                                raise ConnectionError("unavailable: the server closes with 1013")
                            elif kind == "error":
                                if record.message_id and body.get("message_id") == record.message_id:
                                    self._outcome(record, "failed")
                                elif not record.accepted and body.get("client_message_id") == cid:
                                    record.refusals += 1
                                    await asyncio.sleep(1.0)
                                    break  # send it again
                        if record.accepted and record.outcome is None:
                            self.where[i] = f"polling {record.marker}"
                            await self._poll(session, i, record)
                        if record.outcome is not None:
                            await asyncio.sleep(random.uniform(0.3, 0.8))
            except Exception as exc:
                self.where[i] = f"reconnecting after {type(exc).__name__}"
                if pending is not None:
                    pending.refusals += 1
                unknown = [r for r in self.sent if r.accepted and r.outcome is None and r.transport == "ws"]
                for record in unknown:
                    if record.marker.startswith(f"{self.prefix}-u{i}-"):
                        await self._poll(session, i, record)
                await asyncio.sleep(random.uniform(0.5, 1.5))


# --- the faults -----------------------------------------------------------------------------------


async def inject(stack: Stack, scenario: str) -> tuple[float, list[str]]:
    """Inject the scenario's fault; returns (monotonic time the component was back, notes)."""
    notes: list[str] = []
    if scenario == "worker-kill":
        stack.kill_worker()
        await asyncio.sleep(5)
        stack.start_worker()
    elif scenario.startswith("redis-"):
        stack.stop_redis()
        await asyncio.sleep(float(scenario.removeprefix("redis-").removesuffix("s")))
        if not stack.process_alive("worker"):
            notes.append("the worker died while Redis was down")
        await asyncio.to_thread(stack.start_redis)
    elif scenario == "postgres-restart":
        await asyncio.to_thread(stack.restart_postgres)
    elif scenario == "llm-outage":
        for mode in ("429", "529", "hang"):
            stack.llm.mode = mode
            await asyncio.sleep(8)
        stack.llm.mode = "normal"
    elif scenario == "web-restart":
        took = await asyncio.to_thread(stack.stop_process, stack.web, grace=10)
        notes.append(f"web server stopped in {took:.1f} s")
        stack.start_web()
    else:
        raise ValueError(f"unknown scenario {scenario!r}")
    return time.monotonic(), notes


async def drive(
    stack: Stack, api_key: str, tokens_for: Any, scenario: str, users: int, seconds: float, after: float
) -> Row:
    crowd = Users(stack, api_key, scenario, users)
    tokens = await asyncio.to_thread(tokens_for, [crowd.user(i) for i in range(users)])
    began = time.monotonic()
    crowd.stop_at = began + seconds
    load = asyncio.create_task(crowd.run(dict(enumerate(tokens))))
    await asyncio.sleep(max(3.0, seconds * 0.3))
    back, notes = await inject(stack, scenario)
    crowd.stop_at = max(crowd.stop_at, back + after)
    recovered = await probe(stack, api_key, crowd.prefix, back)
    try:
        await asyncio.wait_for(load, max(1.0, crowd.stop_at + 30 + ANSWER_TIMEOUT - time.monotonic()))
    except TimeoutError:
        notes.append(f"load overran; users: {crowd.where}")
    row = Row(scenario, notes=notes)
    row.sent = len(crowd.sent)
    row.accepted = sum(r.accepted for r in crowd.sent)
    row.refused = sum(r.refusals for r in crowd.sent)
    row.recover_s = None if recovered is None else round(recovered - back, 1)
    row.worker_alive = stack.process_alive("worker")
    for name in ("worker", "web"):
        if not stack.process_alive(name):  # a supervisor (agentflow_run, systemd) would restart it
            row.notes.append(f"the {name} process died; restarted")
            getattr(stack, f"start_{name}")()
    try:
        ready_at = await asyncio.to_thread(stack.wait_ready, 120)
    except RuntimeError as exc:
        row.notes.append(str(exc))
        ready_at = time.monotonic()
    while True:
        await asyncio.to_thread(check, crowd, row)
        if row.stuck == 0 or time.monotonic() > ready_at + SETTLE_AFTER_HEALTH:
            break
        await asyncio.sleep(1.0)
    return row


async def probe(stack: Stack, api_key: str, prefix: str, back: float, seconds: float = 90) -> float | None:
    """Send a new user's message every second from ``back``; the time the first one is answered."""
    import aiohttp

    answered: list[float] = []

    async def one(session: Any, n: int) -> None:
        url = f"{stack.base}/api/users/{prefix}-probe{n}/messages"
        try:
            async with session.post(
                url, json={"message": f"probe {n}"}, headers={"X-API-Key": api_key}, timeout=TIMEOUT_40
            ) as response:
                if (await response.json(content_type=None)).get("status") == "done":
                    answered.append(time.monotonic())
        except Exception:
            pass

    async with aiohttp.ClientSession() as session:
        tasks: list[asyncio.Task[None]] = []
        n = 0
        while not answered and time.monotonic() < back + seconds:
            tasks.append(asyncio.create_task(one(session, n)))
            n += 1
            await asyncio.sleep(1.0)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return min(answered) if answered else None


def check(crowd: Users, row: Row) -> None:
    """Fill ``row`` from the database (the scenario's users only)."""
    from django.db import connections

    from conversations.models import Message

    connections.close_all()  # the driver's own connection may be stale (a PostgreSQL restart)
    rows = list(
        Message.objects.filter(
            role=Message.Role.USER, user__external_id__startswith=crowd.prefix + "-u"
        ).values_list("content", "status", "reply__id", "handled_by")
    )
    by_marker: dict[str, list[tuple[str, Any, str]]] = {}
    for content, status, reply, handled_by in rows:
        marker = content[1 : content.index("]")]
        by_marker.setdefault(marker, []).append((status, reply, handled_by))
    told = {r.marker for r in crowd.sent if r.outcome == "failed"}

    def answered(v: list[tuple[str, Any, str]]) -> bool:
        return any(s == "done" and r for s, r, _ in v)

    def held(v: list[tuple[str, Any, str]]) -> bool:  # a human holds the thread (after an escalation)
        return not answered(v) and any(s == "done" and h == "human" for s, _, h in v)

    def failed(v: list[tuple[str, Any, str]]) -> bool:
        return all(s == "failed" for s, _, _ in v)

    row.stored = len(by_marker)
    row.duplicated = sum(len(v) - 1 for v in by_marker.values())
    row.answered = sum(1 for v in by_marker.values() if answered(v))
    row.held = sum(1 for v in by_marker.values() if held(v))
    row.failed = sum(1 for v in by_marker.values() if failed(v))
    row.stuck = row.stored - row.answered - row.held - row.failed
    row.untold = sum(1 for m, v in by_marker.items() if failed(v) and m not in told)
    row.lost = sum(1 for r in crowd.sent if r.accepted and r.marker not in by_marker)


# --- the table ---------------------------------------------------------------------------------------

COLUMNS = [
    "scenario",
    "sent",
    "accepted",
    "stored",
    "answered",
    "held",
    "failed",
    "stuck",
    "duplicated",
    "recover_s",
]


def table(rows: list[Row]) -> str:
    lines = [
        "| " + " | ".join([*COLUMNS, "lost", "untold", "notes"]) + " |",
        "|" + "---|" * (len(COLUMNS) + 3),
    ]
    for row in rows:
        values = [getattr(row, c) for c in COLUMNS] + [row.lost, row.untold, "; ".join(row.notes)]
        lines.append("| " + " | ".join("-" if v is None else str(v) for v in values) + " |")
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------------


def setup_django(stack: Stack) -> tuple[str, Any]:
    os.environ.update(stack.env(AGENTFLOW_DB_POOL_MAX="1", AGENTFLOW_LOG_LEVEL="WARNING"))
    import django

    django.setup()
    from django.core.management import call_command

    from conversations.chat_tokens import chat_token_create
    from conversations.services import api_key_create

    call_command("migrate", verbosity=0)
    _, api_key = api_key_create(name=f"chaos-{stack.run}")

    def tokens_for(users: list[str]) -> list[str]:
        return [chat_token_create(external_id=u) for u in users]

    return api_key, tokens_for


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenario", default=",".join(SCENARIOS), help="comma-separated; default: all")
    parser.add_argument("--users", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=30.0, help="load per scenario (at least)")
    parser.add_argument(
        "--after", type=float, default=15.0, help="seconds the load goes on after the component is back"
    )
    parser.add_argument(
        "--turn-limit",
        type=int,
        default=12,
        help="AGENTFLOW_TURN_TIME_LIMIT of the stack (10-59: short windows)",
    )
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--keep", action="store_true", help="keep .data/chaos/<run> (logs) afterwards")
    args = parser.parse_args(argv)
    scenarios = [s.strip() for s in args.scenario.split(",") if s.strip()]
    unknown = [s for s in scenarios if s not in SCENARIOS]
    if unknown or not scenarios:
        parser.error(f"unknown scenario {unknown}; choose from {', '.join(SCENARIOS)}")
    if args.users < 1 or args.seconds < 5 or not 10 <= args.turn_limit <= 3600:
        parser.error("--users must be at least 1, --seconds at least 5 and --turn-limit 10 to 3600")
    main_guard()
    stack = Stack(keep=args.keep, turn_limit=args.turn_limit)
    rows: list[Row] = []
    began = time.monotonic()
    try:
        stack.start()
        api_key, tokens_for = setup_django(stack)
        stack.start_worker()
        stack.start_web()
        stack.wait_ready(180)
        print(
            f"chaos stack {stack.run} ready in {time.monotonic() - began:.0f} s; logs in {stack.logs}",
            flush=True,
        )
        asyncio.run(_warm(stack, api_key))
        for scenario in scenarios:
            row = asyncio.run(
                drive(stack, api_key, tokens_for, scenario, args.users, args.seconds, args.after)
            )
            rows.append(row)
            print(f"{scenario} ({time.monotonic() - began:.0f} s): {json.dumps(asdict(row))}", flush=True)
        print(table(rows))
        print(f"total {time.monotonic() - began:.0f} s")
        if args.json:
            with open(args.json, "w") as handle:
                json.dump([{**asdict(r), "ok": r.ok} for r in rows], handle, indent=1)
        return 0 if all(r.ok for r in rows) else 1
    finally:
        stack.stop()


async def _warm(stack: Stack, api_key: str) -> None:
    """One turn end to end before the first scenario (model load, first connections)."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        url = f"{stack.base}/api/users/chaos-{stack.run}-warm/messages"
        async with session.post(
            url, json={"message": "warm up"}, headers={"X-API-Key": api_key}, timeout=60
        ) as response:
            body = await response.json()
        deadline = time.monotonic() + 120
        while body.get("status") != "done":  # a cold worker (model load) can take a while
            if time.monotonic() > deadline:
                raise RuntimeError(f"the warm-up turn did not finish: {body}")
            await asyncio.sleep(1)
            async with session.get(f"{url}/{body['message_id']}", headers={"X-API-Key": api_key}) as response:
                body = await response.json()


if __name__ == "__main__":
    sys.exit(main())
