"""Scrub the global memories again with the current scrubber (after an upgrade of it)."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from agentflow.embeddings import get_embedder
from memory.sharing import global_memories_rescrub


class Command(BaseCommand):
    help = (
        "Scrub every global memory again with the current personal-data scrubber; a changed one is "
        "re-embedded and goes back to the admin's review queue, as does one that asks users for a secret."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--batch-size", type=int, default=200, help="memories per transaction (1-10000)")

    def handle(self, *args: Any, batch_size: int, **options: Any) -> None:
        if not 1 <= batch_size <= 10_000:
            raise CommandError(f"--batch-size must be from 1 to 10000; got {batch_size}")
        counts = global_memories_rescrub(embedder=get_embedder(), batch_size=batch_size)
        self.stdout.write(
            f"Checked {counts['checked']} global memories: {counts['scrubbed']} scrubbed again, "
            f"{counts['withdrawn']} sent back to review."
        )
