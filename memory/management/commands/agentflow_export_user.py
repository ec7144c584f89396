"""Export everything stored about one end user as JSON, to stdout or a file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from agentflow.errors import NotFound
from conversations.audit import audit_scope
from memory.privacy import person_export


class Command(BaseCommand):
    help = "Export a user's data as JSON: manage.py agentflow_export_user alice [--output alice.json]"

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("user_id", help="the end user's id (the host application's)")
        parser.add_argument("--output", help="write the JSON to this file instead of stdout")

    def handle(self, *args: Any, user_id: str, output: str | None = None, **options: Any) -> None:
        try:
            with audit_scope(ip=None, route="manage.py agentflow_export_user"):  # audited as the system
                data = person_export(external_id=user_id)
        except NotFound:
            raise CommandError(f"no user {user_id!r}: nothing exported") from None
        text = json.dumps(data, indent=2, ensure_ascii=False)
        if output is None:
            self.stdout.write(text)
            return
        Path(output).write_text(text + "\n", encoding="utf-8")
        self.stderr.write(f"Exported user {user_id!r} to {output}")
