"""Erase one end user and everything stored about them."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from agentflow.errors import NotFound
from conversations.audit import audit_scope
from conversations.selectors import users_with_external_id
from memory.privacy import person_erase


class Command(BaseCommand):
    help = (
        "Erase a user with their sessions, threads, messages, escalations and memories, and remove "
        "their ids from global memories' provenance: manage.py agentflow_erase_user alice --yes"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("user_id", help="the end user's id (the host application's)")
        parser.add_argument("--yes", action="store_true", help="confirm: erasing cannot be undone")

    def handle(self, *args: Any, user_id: str, yes: bool = False, **options: Any) -> None:
        if not users_with_external_id(external_id=user_id).exists():
            raise CommandError(f"no user {user_id!r}: nothing erased")
        if not yes:
            raise CommandError(
                f"erasing user {user_id!r} cannot be undone; pass --yes to confirm. Nothing was erased."
            )
        try:
            with audit_scope(ip=None, route="manage.py agentflow_erase_user"):  # audited as the system
                counts = person_erase(external_id=user_id)
        except NotFound:
            raise CommandError(f"no user {user_id!r}: nothing erased") from None
        self.stdout.write(json.dumps({"erased": counts}, indent=2))
