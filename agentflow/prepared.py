"""Hot queries compiled once per database connection, then run with new parameter values.

Building a queryset (``filter``, ``annotate``, subqueries) and compiling it to SQL cost the turn
more CPU than running the statements: ~0.5 ms per query, several queries a turn. A
:class:`PreparedQuery` builds and compiles its queryset once per connection, with stand-in values
for the parameters, finds where each stand-in landed in the compiled parameters, and afterwards
only swaps in the real values and runs the same SQL through Django's own row conversion (model
instances with ``select_related`` objects and annotations, or ``values()`` dicts).

Only values that are plain SQL parameters may be ``params``; anything that changes the SQL's shape
(a slice, ``None`` versus a value, a list's length) is part of the ``shape`` key. A stand-in that
cannot be found among the compiled parameters (Django put the value into the SQL text, or
transformed it) makes that query run through the ORM as usual, every time.
"""

from __future__ import annotations

import random
import threading
import uuid
import weakref
from collections.abc import Callable, Hashable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from django.db import connections
from django.db.models import QuerySet
from django.db.transaction import TransactionManagementError

Builder = Callable[..., QuerySet[Any]]


def _stand_in(value: Any) -> Any:
    """A value of ``value``'s type that no real parameter of a query will equal."""
    if isinstance(value, uuid.UUID):
        return uuid.uuid4()
    if isinstance(value, datetime):
        return datetime(1901, 1, 1, tzinfo=UTC) + timedelta(microseconds=random.getrandbits(40))
    if isinstance(value, bool):
        raise TypeError("a bool changes the SQL's shape: pass it in shape")
    if isinstance(value, int):
        return -(2**30) - random.getrandbits(20)  # within a 32-bit column: never an overflow
    if isinstance(value, str):
        return f"stand-in-{uuid.uuid4().hex}"
    if isinstance(value, np.ndarray):
        return np.random.default_rng().random(value.shape, dtype=np.float32) + np.float32(2.0)
    raise TypeError(f"no stand-in for a parameter of type {type(value).__name__}")


def _db_value(value: Any) -> Any:
    """How Django passes ``value`` to the driver (vectors go as pgvector's text form)."""
    if isinstance(value, np.ndarray):
        from pgvector.django import VectorField

        return VectorField().get_prep_value(value)
    return value


class _Compiled:
    """One connection's compiled query: the compiler (with its select list and row layout), the SQL,
    its parameters and where each named parameter goes."""

    def __init__(self, queryset: QuerySet[Any], stand_ins: dict[str, Any]) -> None:
        self.queryset = queryset
        self.compiler = queryset.query.get_compiler(using=queryset.db)
        self.sql, params = self.compiler.as_sql()
        self.params = list(params)
        self.slots: list[tuple[int, str]] = []
        wanted = {name: _db_value(value) for name, value in stand_ins.items()}
        for i, param in enumerate(self.params):
            for name, db_value in wanted.items():
                if type(param) is type(db_value) and param == db_value:
                    self.slots.append((i, name))
        self.usable = {name for _, name in self.slots} == set(stand_ins)
        # Later runs skip the compile: the compiler answers with the stored SQL and new parameters.
        self.next_params: list[Any] = self.params
        self.compiler.as_sql = self._as_sql

    def _as_sql(self, *args: Any, **kwargs: Any) -> tuple[str, list[Any]]:
        return self.sql, self.next_params

    def run(self, values: dict[str, Any]) -> list[Any]:
        if self.queryset.query.select_for_update and self.compiler.connection.get_autocommit():
            raise TransactionManagementError("select_for_update cannot be used outside of a transaction.")
        params = list(self.params)
        for i, name in self.slots:
            params[i] = _db_value(values[name])
        self.next_params = params
        try:
            # The queryset's own iterable (models or values()) over this connection's compiler.
            iterable: Any = self.queryset._iterable_class(_Frozen(self.queryset, self.compiler))  # type: ignore[arg-type]
            return list(iterable)
        finally:
            self.next_params = self.params


class _FrozenQuery:
    """The compiled query's ``Query``, whose compiler is the stored one."""

    def __init__(self, query: Any, compiler: Any) -> None:
        self._query, self._compiler = query, compiler

    def get_compiler(self, using: Any = None, connection: Any = None, elide_empty: bool = True) -> Any:
        return self._compiler

    def __getattr__(self, name: str) -> Any:
        return getattr(self._query, name)


class _Frozen:
    """What a queryset's iterable reads of its queryset, for a stored compiler."""

    def __init__(self, queryset: QuerySet[Any], compiler: Any) -> None:
        self.db = queryset.db
        self.model = queryset.model
        self.query = _FrozenQuery(queryset.query, compiler)
        self._known_related_objects: dict[Any, Any] = {}
        self._fields = getattr(queryset, "_fields", None)


class PreparedQuery:
    """A queryset built by ``build(**shape, **params)``, compiled once per connection and shape.

    Args:
        build: returns the queryset; called with the ``shape`` keywords as given and the ``params``
            keywords as stand-ins (the first run on a connection) or real values (the ORM path).
        using: the database alias.
    """

    def __init__(self, build: Builder, *, using: str = "default") -> None:
        self.build, self.using = build, using
        self._by_connection: weakref.WeakKeyDictionary[Any, dict[Hashable, _Compiled]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()

    def run(self, *, shape: dict[str, Hashable] | None = None, **params: Any) -> list[Any]:
        """The rows (model instances, or dicts for ``values()``) for these parameter values."""
        shape = shape or {}
        connection = connections[self.using]
        with self._lock:
            compiled_here = self._by_connection.setdefault(connection, {})
        key = tuple(sorted(shape.items()))
        compiled = compiled_here.get(key)
        if compiled is None:
            stand_ins = {name: _stand_in(value) for name, value in params.items()}
            compiled = _Compiled(self.build(**shape, **stand_ins), stand_ins)
            compiled_here[key] = compiled
        if not compiled.usable:
            return list(self.build(**shape, **params))
        return compiled.run(params)
