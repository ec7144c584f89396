"""A private stack for the web-cost benches: its own PostgreSQL, Valkey, fake LLM, daphne and worker.

The chaos suite's ``Stack`` (``tests/chaos/stack.py``: everything under ``.data/chaos/<run>/``, on free
loopback ports, stopped at exit), run with production settings instead of the chaos suite's short
recovery windows: default turn limit, heartbeat and log level, ``DEBUG`` off. Its Valkey is the
bench's own, so ``INFO commandstats`` counts this stack's commands only. With ``KEEP_STACK=1`` in the
environment its folder (the processes' logs under ``logs/``) is kept after the run.
"""

from __future__ import annotations

import os
import socket
import sys
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from stack import cpu_seconds  # noqa: E402  (bench/stack.py; re-exported for the benches)

from tests.chaos.stack import Stack  # noqa: E402

# The chaos suite's short windows and verbose logs are not production behaviour.
CHAOS_ONLY = (
    "AGENTFLOW_TURN_TIME_LIMIT",
    "AGENTFLOW_WORKER_HEARTBEAT_SECONDS",
    "AGENTFLOW_WORKER_MAX_AGE_SECONDS",
    "AGENT_LLM_TIMEOUT_SECONDS",
    "AGENT_LLM_MAX_RETRIES",
)


class BenchStack(Stack):
    """``Stack`` with production settings; ``extra`` is added to every process's environment."""

    def __init__(self, *, concurrency: int = 8, llm_latency: float = 0.0, **extra: str) -> None:
        super().__init__(concurrency=concurrency, keep=bool(os.environ.get("KEEP_STACK")))
        self.llm.latency = llm_latency
        self.extra = extra

    def env(self, **extra: str) -> dict[str, str]:
        env = super().env()
        for name in CHAOS_ONLY:
            env.pop(name, None)
        env["AGENTFLOW_LOG_LEVEL"] = "WARNING"
        env.update(self.extra)
        env.update(extra)
        return env

    def redis(self) -> Any:
        import redis

        return redis.Redis.from_url(self.redis_url)

    def valkey_cpu_seconds(self) -> float:
        return cpu_seconds(self.valkey_pid) if self.valkey_pid else 0.0

    def up(self) -> None:
        """Start everything, set up this process's Django on the stack, wait until it is ready."""
        self.start()
        os.environ.update(self.env(AGENTFLOW_DB_POOL_MAX="2"))
        import django

        django.setup()
        from django.core.management import call_command

        call_command("migrate", verbosity=0)
        self.start_web()
        self.start_worker()
        self.wait_ready(180)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, for the load outside the measured processes."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = values[3] + values[4]
    return float(sum(values) - idle), float(sum(values))


def commandstats(client: Any) -> dict[str, int]:
    """``INFO commandstats`` as {command: calls} (commands run inside scripts counted too)."""
    info = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): int(stats["calls"]) for name, stats in info.items()}


async def ws_turn(ws: Any, text: str, *, frame_seconds: float) -> dict[str, Any]:
    """Send ``text`` as a ``message`` frame on chat socket ``ws`` and read up to its ``turn`` frame (the
    ``ack`` names the message), waiting at most ``frame_seconds`` for each frame; a turn not done or an ``error`` frame raises ``RuntimeError``."""
    client_id = uuid.uuid4().hex
    await ws.send_json({"type": "message", "client_message_id": client_id, "message": text})
    message_id = None
    while True:
        frame = await ws.receive_json(timeout=frame_seconds)
        if frame.get("type") == "ack" and frame.get("client_message_id") == client_id:
            message_id = frame["message_id"]
        elif frame.get("type") == "turn" and frame.get("message_id") == message_id:
            if frame.get("status") != "done":
                raise RuntimeError(f"WebSocket turn: {frame}")
            return frame
        elif frame.get("type") == "error":
            raise RuntimeError(f"WebSocket error frame: {frame}")
