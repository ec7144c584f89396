"""The web process's SQL and CPU per WebSocket chat message, in-process (no daphne, no worker).

Drives the project's ASGI application (``agentflow_project.asgi``) with channels' test
communicator: --users chat sockets open, then each sends --messages messages one after another
(the first of each user's opens a session; the turns are queued to a queue no worker reads), each
message's ``ack`` awaited before the next. Prints per message: SQL statements, transactions (each
committed or rolled-back transaction, i.e. BEGIN ... COMMIT; statements run in autocommit are
counted apart), statements that read or write the end-user table, and the process's CPU ms; and
the same for opening the sockets. Then, in this thread alone, the CPU of one ``message_accept`` in a live
session: the one statement against the read and ``INSERT`` it replaced, alternated.

    python bench/ws_statements.py [--users 100] [--messages 3] [--rounds 1]

Runs against another checkout's code with ``AGENTFLOW_BENCH_CODE=/path/to/checkout`` (that checkout's
virtualenv's python): before and after a change, from one script. Uses the configured database
(embedded by default) and a Valkey of its own; its users are named <tag>-*, deleted at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = Path(os.environ.get("AGENTFLOW_BENCH_CODE") or BENCH.parent).resolve()
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(BENCH))
TAG = f"wsstmt-{uuid.uuid4().hex[:6]}"

import stack  # noqa: E402

# The project's packages from ROOT, imported now: their submodules then load from there, whatever
# is put on sys.path later (importing Celery's app puts the current directory first).
for package in ("agentflow", "conversations", "intents", "memory", "agentflow_project"):
    __import__(package)

stack.production_settings()
os.environ["AGENTFLOW_BACKGROUND_JOBS"] = "false"
for name in ("AGENTFLOW_CELERY_QUEUE", "AGENTFLOW_CHANNELS_PREFIX", "AGENTFLOW_CACHE_PREFIX"):
    os.environ[name] = TAG  # the queued turns go to a queue no worker reads


class Counter:
    """Statements, transactions and end-user statements of every database connection in the process."""

    def __init__(self, user_table: str) -> None:
        self.user_table = f'"{user_table}"'
        self.lock = threading.Lock()
        self.statements = self.transactions = self.user_reads = self.autocommit = 0

    def __call__(self, execute: Any, sql: str, params: Any, many: bool, context: Any) -> Any:
        conn = context["connection"]
        with self.lock:
            self.statements += 1
            if not conn.in_atomic_block and conn.get_autocommit():
                self.autocommit += 1  # a statement in autocommit: no BEGIN/COMMIT
            if self.user_table in sql:
                self.user_reads += 1
        return execute(sql, params, many, context)

    def ended(self) -> None:
        with self.lock:
            self.transactions += 1

    def take(self) -> tuple[int, int, int, int]:
        with self.lock:
            taken = (self.statements, self.transactions, self.user_reads, self.autocommit)
            self.statements = self.transactions = self.user_reads = self.autocommit = 0
        return taken


def install(counter: Counter) -> None:
    from django.db.backends.base.base import BaseDatabaseWrapper
    from django.db.backends.signals import connection_created

    def created(sender: Any, connection: Any, **kwargs: Any) -> None:
        if counter not in connection.execute_wrappers:
            connection.execute_wrappers.append(counter)

    connection_created.connect(created, weak=False)
    for method in ("commit", "rollback"):
        original = getattr(BaseDatabaseWrapper, method)

        def counted(self: Any, _original: Any = original) -> Any:
            if self.connection is not None and not self.get_autocommit():
                counter.ended()
            return _original(self)

        setattr(BaseDatabaseWrapper, method, counted)


async def _until(communicator: Any, kinds: tuple[str, ...]) -> dict[str, Any]:
    while True:
        frame = await communicator.receive_json_from(timeout=30)
        if frame["type"] in kinds:
            return frame


async def run(users: int, messages: int, counter: Counter) -> dict[str, float]:
    from channels.testing import WebsocketCommunicator

    from agentflow_project.asgi import application
    from conversations.chat_tokens import chat_token_create

    sockets = []
    prefix = f"{TAG}-{uuid.uuid4().hex[:6]}"  # new users each run: the first message opens a session
    counter.take()
    cpu = time.process_time()
    for i in range(users):
        token = chat_token_create(external_id=f"{prefix}-{i}")
        communicator = WebsocketCommunicator(application, f"/ws/chat/?token={token}")
        connected, _ = await communicator.connect(timeout=30)
        assert connected
        assert (await communicator.receive_json_from(timeout=30))["type"] == "ready"
        sockets.append(communicator)
    connect_cpu = time.process_time() - cpu
    connect = counter.take()
    cpu = time.process_time()
    for m in range(messages):
        for i, communicator in enumerate(sockets):
            text = f"{stack.MESSAGES[(i + m) % len(stack.MESSAGES)]} #{m}"
            await communicator.send_json_to(
                {"type": "message", "message": text, "client_message_id": f"c-{m}"}
            )
            frame = await _until(communicator, ("ack", "error"))
            assert frame["type"] == "ack", frame
    message_cpu = time.process_time() - cpu
    sent = counter.take()
    for communicator in sockets:
        await communicator.disconnect()
    n = users * messages
    return {
        "connect_statements": connect[0] / users,
        "connect_transactions": connect[1] / users,
        "connect_user": connect[2] / users,
        "connect_cpu_ms": connect_cpu / users * 1000,
        "connect_autocommit": connect[3] / users,
        "autocommit": sent[3] / n,
        "statements": sent[0] / n,
        "transactions": sent[1] / n,
        "user": sent[2] / n,
        "cpu_ms": message_cpu / n * 1000,
    }


def cache_get_cpu(rounds: int = 6, calls: int = 2000) -> None:
    """CPU of one ``cache.get`` (the chat consumer's revocation check): Django's client, which builds
    a ``redis.Redis`` per command, against one kept per pool (``agentflow.cache``), alternated."""
    from django.core.cache import caches
    from django.core.cache.backends.redis import RedisCacheClient

    try:
        from agentflow.cache import SharedRedisCacheClient
    except ImportError:  # older code
        return
    cache = caches["default"]
    servers, options = cache._shared_servers, cache._shared_options
    clients = {
        "django": RedisCacheClient(servers, **options),
        "kept": SharedRedisCacheClient(servers, **options),
    }
    spent: dict[str, list[float]] = {name: [] for name in clients}
    for _ in range(rounds):
        for name, client in clients.items():
            started = time.thread_time()
            for _ in range(calls):
                client.get("chat-revoked:none", None)
            spent[name].append((time.thread_time() - started) / calls * 1000)
    print(
        f"  cache.get CPU ms a call (median of {rounds} x {calls}): Django's client"
        f" {statistics.median(spent['django']):.3f}, one client per pool {statistics.median(spent['kept']):.3f}"
    )


def accept_cpu(rounds: int = 5, users: int = 50, messages: int = 4) -> None:
    """CPU of storing one message in a live session (``message_accept``, this thread only, no socket):
    the one statement against the read and the ``INSERT`` it replaced (``store_usable`` off: the
    same code's other path), alternated in this process."""
    from conversations import services
    from conversations.agents import agent_settings, message_accept

    usable = getattr(services, "store_usable", None)
    if usable is None:  # older code
        return
    limits = agent_settings(name="agentflow")
    paths = {"one statement": usable, "read + INSERT": lambda: False}
    spent: dict[str, list[float]] = {name: [] for name in paths}
    try:
        for r in range(rounds):
            for n, (name, path) in enumerate(paths.items()):
                services.store_usable = path  # type: ignore[attr-defined]
                ids = [f"{TAG}-accept-{r}-{n}-{i}" for i in range(users)]  # new users: no resends
                for user in ids:  # opens the session
                    message_accept(limits=limits, user_id=user, message="Hello", client_message_id="c-0")
                started = time.thread_time()
                for m in range(1, messages + 1):
                    for user in ids:
                        message_accept(
                            limits=limits, user_id=user, message=f"#{m}", client_message_id=f"c-{m}"
                        )
                spent[name].append((time.thread_time() - started) / (users * messages) * 1000)
    finally:
        services.store_usable = usable  # type: ignore[attr-defined]
    print(
        f"  message_accept CPU ms in a live session (median of {rounds} x {users * messages}): "
        + ", ".join(f"{name} {statistics.median(v):.3f}" for name, v in spent.items())
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=100)
    parser.add_argument("--messages", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    if min(args.users, args.messages, args.rounds) < 1:
        parser.error("--users, --messages and --rounds must be at least 1")
    valkey = stack.OwnValkey()
    os.environ["REDIS_URL"] = valkey.start()
    try:
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        from conversations.models import EndUser

        counter = Counter(EndUser._meta.db_table)
        install(counter)
        asyncio.run(run(5, 2, counter))  # warm up: threads, connections, compiled statements
        results = [asyncio.run(run(args.users, args.messages, counter)) for _ in range(args.rounds)]
        print(
            f"code: {Path(sys.modules['conversations'].__file__ or '').parent.parent}  ({args.users} sockets x {args.messages} messages, {args.rounds} rounds; medians)"
        )

        def med(key: str) -> float:
            return statistics.median(r[key] for r in results)

        print(
            f"  per message:    {med('statements'):.2f} statements, {med('transactions'):.2f} transactions,"
            f" ({med('autocommit'):.2f} in autocommit), {med('user'):.2f} end-user statements,"
            f" {med('cpu_ms'):.2f} ms CPU"
        )
        print(
            f"  per connection: {med('connect_statements'):.2f} statements,"
            f" {med('connect_transactions'):.2f} transactions ({med('connect_autocommit'):.2f} in autocommit),"
            f" {med('connect_user'):.2f} end-user statements,"
            f" {med('connect_cpu_ms'):.2f} ms CPU"
        )
        cache_get_cpu()
        accept_cpu()
    finally:
        from conversations.models import EndUser

        EndUser.objects.filter(external_id__startswith=TAG).delete()
        valkey.stop()


if __name__ == "__main__":
    main()
