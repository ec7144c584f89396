"""Wrap named functions in place, for the step-by-step CPU benches (bench/turn_steps.py in-process,
bench/worker_steps.py inside Celery workers)."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from typing import Any


def wrap_steps(
    steps: Iterable[tuple[str, str]], timed: Callable[[str, Callable[..., Any]], Callable[..., Any]]
) -> None:
    """Replace each ``(module, "attr" or "Class.method")`` where its callers look it up with
    ``timed(name, original)``; ``name`` is the module's last part and the attribute."""
    for module_name, attribute in steps:
        owner: Any = importlib.import_module(module_name)
        *path, last = attribute.split(".")
        for part in path:
            owner = getattr(owner, part)
        setattr(owner, last, timed(f"{module_name.rsplit('.', 1)[-1]}.{attribute}", getattr(owner, last)))
