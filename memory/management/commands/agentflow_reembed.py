"""Re-embed memories after the embedding model changed (``AGENTFLOW["EMBEDDER"]``)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from django.core.management.base import BaseCommand, CommandError, CommandParser

from agentflow.embeddings import get_embedder
from memory.services import memories_reembed, memories_to_reembed


class ProgressBar:
    """A one-line progress bar on a terminal stream (a line per update elsewhere, e.g. in logs)."""

    def __init__(self, total: int, stream: TextIO, width: int = 30) -> None:
        self.total, self.stream, self.width = total, stream, width
        self.done = 0
        self.started = time.monotonic()
        self.tty = stream.isatty() if hasattr(stream, "isatty") else False

    def update(self, count: int) -> None:
        self.done += count
        share = self.done / self.total if self.total else 1.0
        filled = int(self.width * min(share, 1.0))
        rate = self.done / max(time.monotonic() - self.started, 1e-9)
        bar = f"[{'#' * filled}{'.' * (self.width - filled)}] {self.done}/{self.total} ({share:.0%}) {rate:.0f}/s"
        self.stream.write(("\r" + bar) if self.tty else bar + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")


class Command(BaseCommand):
    help = (
        "Re-embed memories made with another embedding model than the current one (resumable: "
        "a re-run continues where it stopped). --all re-embeds every memory."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument(
            "--batch-size", type=int, default=256, help="memories per batch and transaction (1-10000)"
        )
        parser.add_argument("--all", action="store_true", dest="everything", help="re-embed every memory")
        parser.add_argument(
            "--embedder",
            help="name (minilm, e5-small, ...) or dotted path of the embedder (default: AGENTFLOW['EMBEDDER'])",
        )
        parser.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")

    def handle(
        self,
        *args: Any,
        batch_size: int,
        everything: bool,
        embedder: str | None,
        no_progress: bool,
        **options: Any,
    ) -> None:
        if not 1 <= batch_size <= 10_000:
            raise CommandError(f"--batch-size must be from 1 to 10000; got {batch_size}")
        try:
            model = get_embedder(embedder)
        except (ImportError, TypeError, ValueError) as exc:
            raise CommandError(f"cannot load the embedder {embedder!r}: {exc}") from None
        total = memories_to_reembed(model_id=model.model_id, everything=everything).count()
        if total == 0:
            self.stdout.write(f"Nothing to re-embed: every memory is embedded with {model.model_id}.")
            return
        stream: Any = getattr(self.stderr, "_out", sys.stderr)
        bar = None if no_progress else ProgressBar(total, stream)
        done = memories_reembed(
            embedder=model, batch_size=batch_size, everything=everything, on_batch=bar.update if bar else None
        )
        if bar is not None:
            bar.close()
        self.stdout.write(f"Re-embedded {done} memories with {model.model_id}.")
