"""Run the product: the ASGI web server (HTTP, WebSocket, admin, API) and a Celery worker.

Both run as child processes; Ctrl-C (or SIGTERM) stops both, then the embedded PostgreSQL and
Valkey servers unless ``--keep-services`` is given.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

from agentflow_project import runtime
from agentflow_project.env import env_int


class Command(BaseCommand):
    help = "Start the web server (daphne) and a Celery worker; stop both on Ctrl-C."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--host", default=os.environ.get("AGENTFLOW_HOST", "127.0.0.1"))
        parser.add_argument(
            "--port", type=int, default=env_int("AGENTFLOW_PORT", 8000, minimum=1, maximum=65535)
        )
        parser.add_argument("--concurrency", type=int, default=settings.CELERY_WORKER_CONCURRENCY)
        parser.add_argument("--keep-services", action="store_true", help="leave embedded servers running")

    def handle(
        self, *args: Any, host: str, port: int, concurrency: int, keep_services: bool, **options: Any
    ) -> None:
        if not 1 <= port <= 65535:
            raise CommandError(f"--port must be from 1 to 65535; got {port}")
        if not 1 <= concurrency <= 86:
            raise CommandError(
                f"--concurrency must be from 1 to 86 (PostgreSQL allows 100 connections); got {concurrency}"
            )
        python = sys.executable
        # The worker sizes its database pool from this (see runtime.database_settings).
        worker_env = {**os.environ, "AGENTFLOW_WORKER_CONCURRENCY": str(concurrency)}
        children = [
            subprocess.Popen(
                # A deep accept queue: a burst of widget (re)connections is not refused.
                [
                    python,
                    "-m",
                    "daphne",
                    "-e",
                    f"tcp:port={port}:interface={host.replace(':', chr(92) + ':')}:backlog=1024",
                    "agentflow_project.asgi:application",
                ]
            ),
            subprocess.Popen(
                [
                    python,
                    "-m",
                    "celery",
                    "-A",
                    "agentflow_project",
                    "worker",
                    "-P",
                    "threads",
                    "-c",
                    str(concurrency),
                    "-Q",
                    settings.CELERY_TASK_DEFAULT_QUEUE,
                    "-l",
                    "INFO",
                    # embedded beat: periodic jobs such as memory.sweep_ended_sessions
                    "-B",
                    "-s",
                    str(runtime.data_dir() / "celerybeat-schedule"),
                ],
                env=worker_env,
            ),
        ]
        mode = "OFFLINE (no ANTHROPIC_API_KEY)" if not settings.ANTHROPIC_API_KEY else "online"
        self.stdout.write(
            self.style.SUCCESS(
                f"AgentFlow is starting ({mode}): http://{host}:{port}/admin/  API docs http://{host}:{port}/api/docs"
            )
        )
        stopping = False

        def stop(signum: int, frame: Any) -> None:
            nonlocal stopping
            stopping = True

        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGTERM, stop)
        try:
            while not stopping and all(child.poll() is None for child in children):
                time.sleep(0.5)
        finally:
            for child in children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)
            for child in children:
                try:
                    child.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    child.kill()
            if not keep_services:
                runtime.stop_valkey()
                if not runtime.env_str("DATABASE_URL"):
                    from django.db import connections

                    connections.close_all()
                    runtime.stop_postgres()
        failed = [
            str(c.args[2])  # type: ignore[index]
            for c in children
            if c.returncode not in (0, -signal.SIGTERM, None) and not stopping
        ]
        if failed:
            raise CommandError(f"{', '.join(failed)} exited unexpectedly; see the log above")
