"""Start, stop or show the embedded PostgreSQL and Valkey servers."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandParser

from agentflow_project import runtime


class Command(BaseCommand):
    help = "start | stop | status of the embedded PostgreSQL (+pgvector) and Redis (Valkey) servers"

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("action", choices=["start", "stop", "status"])

    def handle(self, *args: Any, action: str, **options: Any) -> None:
        # Loading settings already started (or attached to) whatever the environment asks for.
        if action == "status" or action == "start":
            db = settings.DATABASES["default"]
            pg = "embedded, running" if runtime.postgres_running() else "not running"
            where = db["HOST"] if db["HOST"].startswith("/") else f"{db['HOST']}:{db['PORT']}"
            self.stdout.write(
                f"postgres: {where} ({'DATABASE_URL' if runtime.env_str('DATABASE_URL') else pg})"
            )
            self.stdout.write(f"redis: {runtime.redacted_url(settings.REDIS_URL)} ({settings.REDIS_SOURCE})")
            return
        stopped_pg = runtime.stop_postgres()
        stopped_redis = runtime.stop_valkey()
        self.stdout.write(f"postgres: {'stopped' if stopped_pg else 'was not running'}")
        self.stdout.write(f"valkey: {'stopped' if stopped_redis else 'was not running'}")
