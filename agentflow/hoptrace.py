"""Per-hop timestamps of a turn, for finding where its latency goes (off unless asked for).

With ``AGENTFLOW_HOP_TRACE`` set to a folder, each process appends one line per hop it passes to
``<folder>/<pid>.log``: the message's id (or the client's ``client_message_id``), the hop's name, the
time (``time.time()``, one clock for every process of a host) and the thread. ``bench/production_load.py
--trace`` sets it for the stack it starts and joins the lines per message (docs/operations.md, "Tail
latency of chatting users"). Off, a hop costs one check of a module global.

Hops: ``w_stored`` / ``w_queued`` (the web process, around the turn task's publish), ``k_recv`` (a worker's
consumer received the task), ``k_start`` (a worker thread starts it), ``k_typing`` (the typing event
sent), ``k_turned`` (the turn stored its reply), ``k_shown`` (the thread change read), ``k_announced``
(the end's events sent), ``w_relay`` (the web process popped the turn's end from the channel layer).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any, TextIO

_lock = threading.Lock()
_file: TextIO | None = None
_folder: str | None = None  # read from the environment at the first hop


def configure(folder: str | None = None) -> None:
    """Trace into ``folder`` ("": off; None: ``AGENTFLOW_HOP_TRACE`` again, read at the next hop)."""
    global _folder, _file
    with _lock:
        if _file is not None:
            _file.close()
        _folder, _file = folder, None


def _folder_now() -> str:
    global _folder
    if _folder is None:
        _folder = os.environ.get("AGENTFLOW_HOP_TRACE", "")
    return _folder


def tracing() -> bool:
    """Whether hops are written (for a caller that would compute a key only to trace it)."""
    return bool(_folder if _folder is not None else _folder_now())


def mark(key: Any, hop: str) -> None:
    """Write that ``key`` (a message id, a client_message_id) passed ``hop`` now, when tracing."""
    global _file
    folder = _folder if _folder is not None else _folder_now()
    if not folder:
        return
    line = f"{key} {hop} {time.time():.6f} {threading.get_ident() % 100000}\n"
    with _lock:  # whole lines from every thread
        if _file is None:
            _file = open(os.path.join(folder, f"{os.getpid()}.log"), "a", buffering=1)
        _file.write(line)
