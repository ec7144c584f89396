"""Make the Django project ready when AgentFlow is used from a plain Python script.

``AgentFrameworkBuilder.build()`` calls these, so the seed's quick start works as written: it
configures Django with ``agentflow_project.settings`` (unless the host already did) and applies
pending migrations (unless ``AGENTFLOW_AUTO_MIGRATE=false``).
"""

from __future__ import annotations

import logging
import os
import threading

logger = logging.getLogger("agentflow.bootstrap")
_migrated = threading.Event()
_lock = threading.Lock()


def ensure_django() -> None:
    from django.apps import apps

    if apps.ready:
        return
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
    import django

    django.setup()


def ensure_schema() -> None:
    """Apply unapplied migrations once per process (fast no-op when up to date)."""
    if _migrated.is_set():
        return
    with _lock:
        if _migrated.is_set():
            return
        from django.core.management import call_command
        from django.db import connection
        from django.db.migrations.executor import MigrationExecutor

        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
        if plan:
            if os.environ.get("AGENTFLOW_AUTO_MIGRATE", "true").strip().lower() in (
                "0",
                "false",
                "no",
                "off",
            ):
                raise RuntimeError(f"{len(plan)} migrations are not applied; run `python manage.py migrate`")
            logger.info("applying %d migrations", len(plan))
            call_command("migrate", interactive=False, verbosity=0)
        _migrated.set()
