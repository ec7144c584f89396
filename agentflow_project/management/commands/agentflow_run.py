"""Run the product: the ASGI web server (HTTP, WebSocket, admin, API) and a Celery worker.

Both run as child processes, each in a process group of its own, and this command supervises them:

* A child that exits while the command runs is restarted (its whole process group is killed first,
  so the worker's embedded beat never outlives it), after a backoff that doubles from
  ``RESTART_BACKOFF_FIRST`` to ``RESTART_BACKOFF_MAX`` seconds, and at most ``RESTART_LIMIT`` times
  per ``RESTART_WINDOW_SECONDS`` (beyond that the next restart waits for the window). The other child
  keeps running: a dead worker never takes the web server down, nor the reverse. Every exit and
  restart is logged with its exit code.
* Ctrl-C or SIGTERM drains: both children get SIGTERM (Celery's warm shutdown finishes the turns in
  flight and takes no new ones; daphne stops listening), the command waits up to ``--drain-seconds``
  (``AGENTFLOW_DRAIN_SECONDS``, default 30), SIGKILLs whatever is left (a second Ctrl-C does so at
  once), stops the embedded PostgreSQL and Valkey servers unless ``--keep-services`` is given, and
  exits 0.
"""

from __future__ import annotations

import collections
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.core.management.base import BaseCommand, CommandError, CommandParser

from agentflow_project import runtime
from agentflow_project.env import env_int

RESTART_BACKOFF_FIRST = 1.0  # seconds before the first restart of a child that exited
RESTART_BACKOFF_MAX = 30.0  # the backoff doubles up to this
STABLE_SECONDS = 60.0  # a child that ran this long before exiting restarts after the first backoff again
RESTART_LIMIT = 5  # restarts of one child per window ...
RESTART_WINDOW_SECONDS = 300.0  # ... beyond them the next restart waits until the window allows it
TICK_SECONDS = 0.2


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"exit code {code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"exit code {code}"
    return f"exit code {code}"


def _kill_group(pgid: int) -> None:
    """SIGKILL every process left in the group ``pgid`` (a child's own group; see ``_Child.start``)."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _default_model() -> str | None:
    """The default agent's LLM model: its stored configuration, under this process's AGENT_* variables."""
    from agentflow.conf import conf
    from agentflow.config import AgentFrameworkConfig, deep_merge, env_overrides
    from conversations.models import Agent

    try:
        stored = Agent.objects.filter(name=conf().DEFAULT_AGENT).values_list("config", flat=True).first()
        env_data, _ = env_overrides(os.environ)
        return AgentFrameworkConfig.model_validate(deep_merge(stored or {}, env_data)).llm_config.model
    except Exception:  # a start-up note only: never keep the product from starting
        return None


@dataclass
class _Child:
    """One supervised child process and its restart bookkeeping."""

    name: str
    argv: list[str]
    env: dict[str, str] | None = None
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    backoff: float = RESTART_BACKOFF_FIRST
    restart_at: float = 0.0
    restarts: collections.deque[float] = field(default_factory=collections.deque)

    def start(self) -> None:
        # A session (and process group) of its own: the terminal's Ctrl-C reaches only this command,
        # which drains in order, and the group holds whatever the child forks (the worker's beat).
        self.process = subprocess.Popen(self.argv, env=self.env, start_new_session=True)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class Command(BaseCommand):
    help = (
        "Start the web server (daphne) and a Celery worker, restart either when it exits, and drain"
        " both on Ctrl-C or SIGTERM."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("AGENTFLOW_HOST", "127.0.0.1"))
        parser.add_argument(
            "--port", type=int, default=env_int("AGENTFLOW_PORT", 8000, minimum=1, maximum=65535)
        )
        parser.add_argument(
            "--concurrency",
            type=int,
            default=settings.CELERY_WORKER_CONCURRENCY,
            help="threads of each worker process (AGENTFLOW_WORKER_CONCURRENCY)",
        )
        parser.add_argument(
            "--workers",
            type=int,
            default=runtime.worker_processes(),
            help="Celery worker processes (AGENTFLOW_WORKER_PROCESSES, default one per usable core up to 4):"
            " one uses at most one core (the GIL)",
        )
        parser.add_argument(
            "--drain-seconds",
            type=int,
            default=env_int("AGENTFLOW_DRAIN_SECONDS", 30, minimum=1, maximum=3600),
            help="on SIGTERM, wait this long for turns in flight before killing the children",
        )
        parser.add_argument("--keep-services", action="store_true", help="leave embedded servers running")

    def handle(
        self,
        *args: Any,
        host: str,
        port: int,
        concurrency: int,
        workers: int,
        drain_seconds: int,
        keep_services: bool,
        **options: Any,
    ) -> None:
        if not 1 <= port <= 65535:
            raise CommandError(f"--port must be from 1 to 65535; got {port}")
        if not 1 <= concurrency <= runtime.WORKER_CONCURRENCY_MAX:
            raise CommandError(
                f"--concurrency must be from 1 to {runtime.WORKER_CONCURRENCY_MAX}; got {concurrency}"
            )
        if not 1 <= workers <= 16:
            raise CommandError(f"--workers must be from 1 to 16; got {workers}")
        if not 1 <= drain_seconds <= 3600:
            raise CommandError(f"--drain-seconds must be from 1 to 3600; got {drain_seconds}")
        python = sys.executable
        # The worker sizes its database pool from this (see runtime.database_settings).
        worker_env = {**os.environ, "AGENTFLOW_WORKER_CONCURRENCY": str(concurrency)}
        if workers > 1 and not os.environ.get("AGENTFLOW_DB_POOL_MAX"):
            # Several workers share PostgreSQL's connections with the web server, whose pool comes from
            # the same environment as this process's.
            web_pool = settings.DATABASES["default"]["OPTIONS"].get("pool", {}).get("max_size", 1)
            try:
                pool = runtime.worker_pool_max(workers=workers, concurrency=concurrency, web_pool=web_pool)
            except ImproperlyConfigured as exc:
                raise CommandError(str(exc)) from None
            worker_env["AGENTFLOW_DB_POOL_MAX"] = str(pool)
        children = [
            _Child("web server (daphne)", runtime.web_command(port=port, host=host, python=python)),
        ]
        for n in range(1, workers + 1):
            children.append(
                _Child(
                    "worker (celery)" if workers == 1 else f"worker {n} (celery)",
                    runtime.worker_command(
                        concurrency=concurrency,
                        queue=settings.CELERY_TASK_DEFAULT_QUEUE,
                        # Periodic jobs run once: in the first worker only.
                        beat_schedule=runtime.data_dir() / "celerybeat-schedule" if n == 1 else None,
                        python=python,
                        hostname=None if workers == 1 else f"worker{n}@%h",
                    ),
                    env=worker_env,
                )
            )
        signals = 0

        def stop(signum: int, frame: Any) -> None:
            nonlocal signals
            signals += 1

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            for child in children:
                child.start()
            mode = "OFFLINE (no ANTHROPIC_API_KEY)" if not settings.ANTHROPIC_API_KEY else "online"
            for line in runtime.describe_services(llm_model=_default_model()):
                self.stdout.write(f"agentflow_run: {line}")
            self.stdout.write(
                self.style.SUCCESS(
                    f"AgentFlow is starting ({mode}): http://{host}:{port}/admin/  API docs http://{host}:{port}/api/docs"
                )
            )
            while not signals:
                for child in children:
                    self._supervise(child)
                time.sleep(TICK_SECONDS)
        finally:
            self._drain(children, drain_seconds, lambda: signals > 1)
            if not keep_services:
                runtime.stop_valkey()
                if not runtime.env_str("DATABASE_URL"):
                    from django.db import connections

                    connections.close_all()
                    runtime.stop_postgres()

    def _log(self, message: str) -> None:
        self.stderr.write(f"agentflow_run: {message}")
        self.stderr.flush()

    def _supervise(self, child: _Child) -> None:
        """Notice that ``child`` exited and schedule its restart; start it when its time has come."""
        now = time.monotonic()
        if child.process is not None:
            code = child.process.poll()
            if code is None:
                return
            _kill_group(child.process.pid)  # whatever it forked (the worker's embedded beat) goes too
            uptime = now - child.started_at
            if uptime >= STABLE_SECONDS:
                child.backoff = RESTART_BACKOFF_FIRST
            delay = child.backoff
            child.backoff = min(child.backoff * 2, RESTART_BACKOFF_MAX)
            while child.restarts and now - child.restarts[0] >= RESTART_WINDOW_SECONDS:
                child.restarts.popleft()
            if len(child.restarts) >= RESTART_LIMIT:
                delay = max(delay, child.restarts[0] + RESTART_WINDOW_SECONDS - now)
            child.restart_at = now + delay
            child.process = None
            self._log(
                self.style.WARNING(
                    f"the {child.name} exited unexpectedly ({_describe_exit(code)}) after {uptime:.1f} s;"
                    f" restarting it in {delay:.1f} s ({len(child.restarts)} restarts in the last"
                    f" {RESTART_WINDOW_SECONDS:.0f} s)"
                )
            )
            return
        if now >= child.restart_at:
            child.restarts.append(now)
            child.start()
            assert child.process is not None
            self._log(f"restarted the {child.name} (pid {child.process.pid})")

    def _drain(self, children: list[_Child], seconds: int, forced: Callable[[], bool]) -> None:
        """SIGTERM every child, wait up to ``seconds`` (or until ``forced()``), then SIGKILL the rest."""
        running = [child for child in children if child.alive()]
        if running:
            self._log(f"stopping: waiting up to {seconds} s for turns in flight")
        for child in running:
            assert child.process is not None
            child.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        deadline = started + seconds
        while any(child.alive() for child in running) and time.monotonic() < deadline and not forced():
            time.sleep(0.1)
        for child in children:
            if child.process is None:
                continue
            if child.alive():
                self._log(self.style.WARNING(f"the {child.name} did not stop within {seconds} s; killing it"))
            _kill_group(child.process.pid)  # the child, if still there, and anything it left behind
            child.process.wait()
        if running:
            self._log(f"stopped in {time.monotonic() - started:.1f} s")
