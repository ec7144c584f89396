"""Django's PostgreSQL backend, starting the embedded PostgreSQL on the first connection.

With no ``DATABASE_URL`` the settings point here. Importing the settings starts nothing (a
``manage.py check``, mypy's Django plugin or a host project's import stay free of side effects);
the server is started, or attached to, when a process first talks to the database.
"""

from __future__ import annotations

import threading

from django.db.backends.postgresql import base

_started = threading.Event()
_lock = threading.Lock()


def _ensure_started() -> None:
    if _started.is_set():
        return
    with _lock:
        if not _started.is_set():
            from agentflow_project.runtime import ensure_postgres

            ensure_postgres()
            _started.set()


class DatabaseWrapper(base.DatabaseWrapper):
    def get_new_connection(self, conn_params: dict) -> object:
        _ensure_started()
        return super().get_new_connection(conn_params)

    @property
    def pool(self) -> object:
        if self.settings_dict["OPTIONS"].get("pool"):
            _ensure_started()
        return super().pool
