"""Hot queries compiled once per process, then run with new parameter values on any connection.

Building a queryset (``filter``, ``annotate``, subqueries) and compiling it to SQL cost the turn
more CPU than running the statements: ~0.5 ms per query, several queries a turn. A
:class:`PreparedQuery` builds and compiles its queryset once, with stand-in values for the
parameters, finds where each stand-in landed in the compiled parameters, and afterwards only swaps
in the real values and runs the same SQL through Django's own row conversion (model instances with
``select_related`` objects and annotations, or ``values()`` dicts). Each connection (each thread's:
a Celery worker has one per worker thread) runs it through a copy of the compiler bound to it; the
SQL, its parameters and row layout are shared.

Only values that are plain SQL parameters may be ``params``; anything that changes the SQL's shape
(a slice, ``None`` versus a value, a list's length) is part of the ``shape`` key. A stand-in that
cannot be found among the compiled parameters (Django put the value into the SQL text, or
transformed it) makes that query run through the ORM as usual, every time.
"""

from __future__ import annotations

import contextlib
import copy
import random
import threading
import types
import uuid
import weakref
from collections.abc import Callable, Hashable
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from django.db import DatabaseError, DataError, connections, router, transaction
from django.db.models import F, QuerySet, signals
from django.db.models.fields import NOT_PROVIDED
from django.db.transaction import TransactionManagementError
from pgvector import Vector

from agentflow.vectors import VectorField, vector_param, vector_to_binary, vector_to_db

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


def _identity(value: Any) -> Any:
    return value


def _db_forms(value: Any) -> list[tuple[Any, Callable[[Any], Any]]]:
    """How Django may pass ``value`` to the driver, each with the function that makes that form.
    A vector goes in binary (``vector_to_binary``) or as text, written by a ``VectorField`` or
    ``agentflow.vectors.CosineDistance`` (``agentflow.vectors.vector_param``), or as text by
    pgvector's own distance functions (``Vector.to_text``)."""
    if isinstance(value, np.ndarray):
        return [
            (vector_to_binary(value), vector_to_binary),
            (vector_to_db(value), vector_to_db),
            (Vector._to_db(value), Vector._to_db),
        ]
    return [(value, _identity)]


class _Compiled:
    """One connection's compiled query: the compiler (with its select list and row layout), the SQL,
    its parameters and where each named parameter goes."""

    def __init__(self, queryset: QuerySet[Any], stand_ins: dict[str, Any]) -> None:
        self.queryset = queryset
        self.compiler = queryset.query.get_compiler(using=queryset.db)
        self.sql, params = self.compiler.as_sql()
        self.params = list(params)
        self.slots: list[tuple[int, str, Callable[[Any], Any]]] = []
        wanted = {name: _db_forms(value) for name, value in stand_ins.items()}
        for i, param in enumerate(self.params):
            for name, forms in wanted.items():
                for db_value, convert in forms:
                    if type(param) is type(db_value) and param == db_value:
                        self.slots.append((i, name, convert))
        self.usable = {name for _, name, _ in self.slots} == set(stand_ins)
        # Later runs skip the compile: the compiler answers with the stored SQL and new parameters.
        self.next_params: list[Any] = self.params
        self.compiler.as_sql = self._as_sql
        # Each run asks for the row converters of the same select list: ask Django once.
        self._converters: dict[tuple[int, ...], Any] = {}
        self._get_converters = self.compiler.get_converters
        self.compiler.get_converters = self._converters_of

    def for_connection(self, connection: Any) -> _Compiled:
        """This query for ``connection`` (another thread's): the SQL, its parameters, the stand-ins'
        slots and the row layout are shared; the compiler is a copy bound to ``connection``, with row
        converters of its own."""
        bound = copy.copy(self)
        compiler = bound.compiler = copy.copy(self.compiler)
        compiler.connection = connection
        bound.next_params = bound.params
        bound._converters = {}
        bound._get_converters = types.MethodType(type(compiler).get_converters, compiler)
        compiler.as_sql = bound._as_sql
        compiler.get_converters = bound._converters_of
        return bound

    def _as_sql(self, *args: Any, **kwargs: Any) -> tuple[str, list[Any]]:
        return self.sql, self.next_params

    def _converters_of(self, expressions: list[Any]) -> Any:
        key = tuple(map(id, expressions))
        if (found := self._converters.get(key)) is None:
            # Keyed by identity: keep the expressions alive with their converters.
            found = self._converters[key] = (self._get_converters(expressions), list(expressions))
        return found[0]

    def run(self, values: dict[str, Any]) -> list[Any]:
        if self.queryset.query.select_for_update and self.compiler.connection.get_autocommit():
            raise TransactionManagementError("select_for_update cannot be used outside of a transaction.")
        params = list(self.params)
        db_values: dict[tuple[str, Any], Any] = {}  # a vector used twice in the SQL is converted once
        for i, name, convert in self.slots:
            if (key := (name, convert)) not in db_values:
                db_values[key] = convert(values[name])
            params[i] = db_values[key]
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
    """A queryset built by ``build(**shape, **params)``, compiled once per process and shape, run on
    each connection through a compiler of its own (``_Compiled.for_connection``).

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
        self._compiled: dict[Hashable, _Compiled] = {}  # per shape, the first compile (any connection's)
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
            first = self._compiled.get(key)
            if first is None:
                stand_ins = {name: _stand_in(value) for name, value in params.items()}
                made = _Compiled(self.build(**shape, **stand_ins), stand_ins)
                made.compiler.connection = None  # only copies run: keep no thread's connection alive
                first = self._compiled.setdefault(key, made)
            compiled = compiled_here[key] = first.for_connection(connection)
        if not compiled.usable:
            return list(self.build(**shape, **params))
        return compiled.run(params)


# --- writes --------------------------------------------------------------------------------------
#
# ``Model.objects.create`` and ``save(update_fields=...)`` build and compile their INSERT or UPDATE
# on every call (~0.4 ms of CPU each), though the SQL depends only on the model and the field list.
# These two keep the SQL per model, field list and database, and only compute the values. A model
# with save signal receivers, parents (multi-table inheritance), database defaults, generated fields
# or custom placeholders, and any value that is an expression, take the ORM's own path.

_write_sql: dict[Hashable, tuple[str, list[Any], list[Any]]] = {}


def _plain_model(model: Any) -> bool:
    opts = model._meta
    if opts.parents or signals.pre_save.has_listeners(model) or signals.post_save.has_listeners(model):
        return False
    return not any(
        getattr(f, "generated", False)
        or getattr(f, "db_default", NOT_PROVIDED) is not NOT_PROVIDED
        or hasattr(f, "get_placeholder")
        for f in opts.local_concrete_fields
    )


def _has_expression(values: list[Any]) -> bool:
    return any(hasattr(v, "resolve_expression") for v in values)


def _db_value(field: Any, value: Any, connection: Any) -> Any:
    """``field``'s value for the INSERT or UPDATE here, where the column gives the parameter its type:
    an array for a vector column in binary (``agentflow.vectors.vector_param``), the rest as Django
    prepares it."""
    if isinstance(field, VectorField) and isinstance(value, np.ndarray):
        return vector_param(value, connection)
    return field.get_db_prep_save(value, connection=connection)


def plain_model(model: Any) -> bool:
    """Whether ``model``'s rows may be written by a compiled statement of one's own (``create``'s
    rule): no save signal receivers, no parents, no database defaults, generated fields or custom
    placeholders. Otherwise write through the ORM."""
    return _plain_model(model)


def insert_params(obj: Any, fields: list[Any], connection: Any) -> list[Any] | None:
    """The parameters of an ``INSERT`` of the unsaved ``obj``'s ``fields`` on ``connection``, as
    ``create`` computes them (``pre_save``, e.g. ``auto_now_add`` times, then the database form); None
    when a value is an expression (the ORM must write it)."""
    raw = [f.pre_save(obj, add=True) for f in fields]
    if _has_expression(raw):
        return None
    return [_db_value(f, v, connection) for f, v in zip(fields, raw, strict=True)]


def create(model: Any, /, **kwargs: Any) -> Any:
    """``model.objects.create(**kwargs)`` with its INSERT compiled once per model and database."""
    obj = model(**kwargs)
    using = router.db_for_write(model, instance=obj)
    if not _plain_model(model):
        obj.save(force_insert=True, using=using)
        return obj
    obj._prepare_related_fields_for_save(operation_name="save")
    connection = connections[using]
    opts = model._meta
    pk_set = obj.pk is not None
    key = ("insert", model, pk_set, connection.alias)
    if (cached := _write_sql.get(key)) is None:
        from django.db.models.sql import InsertQuery

        fields = [f for f in opts.local_concrete_fields if pk_set or f is not opts.pk]
        returning = list(opts.db_returning_fields)
        query = InsertQuery(model)
        query.insert_values(fields, [obj])
        compiler = query.get_compiler(using=using)
        compiler.returning_fields = returning
        [(sql, _)] = compiler.as_sql()
        cached = _write_sql[key] = (sql, fields, returning)
    sql, fields, returning = cached
    raw = [f.pre_save(obj, add=True) for f in fields]
    if _has_expression(raw):
        obj.save(force_insert=True, using=using)
        return obj
    params = [_db_value(f, v, connection) for f, v in zip(fields, raw, strict=True)]
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone() if returning else None
    for field, value in zip(returning, row or (), strict=False):
        for converter in field.get_db_converters(connection):
            value = converter(value, field, connection)
        setattr(obj, field.attname, value)
    obj._state.adding, obj._state.db = False, using
    return obj


def save_fields(obj: Any, fields: list[str], *, using: str | None = None) -> None:
    """``obj.save(update_fields=fields)`` with its UPDATE compiled once per model, fields and database."""
    model = type(obj)
    using = using or router.db_for_write(model, instance=obj)
    names = model._meta._non_pk_concrete_field_names
    if not _plain_model(model) or obj.pk is None or not fields or not names.issuperset(fields):
        obj.save(update_fields=fields, using=using)
        return
    obj._prepare_related_fields_for_save(operation_name="save")
    connection = connections[using]
    key = ("update", model, tuple(fields), connection.alias)
    if (cached := _write_sql.get(key)) is None:
        opts = model._meta
        targets = [opts.get_field(name) for name in fields]
        if any(f.model is not model for f in targets):
            obj.save(update_fields=fields, using=using)
            return
        qn = connection.ops.quote_name
        sql = (
            f"UPDATE {qn(opts.db_table)} SET "
            + ", ".join(f"{qn(f.column)} = %s" for f in targets)
            + f" WHERE {qn(opts.pk.column)} = %s"
        )
        cached = _write_sql[key] = (sql, targets, [])
    sql, targets, _ = cached
    raw = [f.pre_save(obj, add=False) for f in targets]
    if _has_expression(raw):
        obj.save(update_fields=fields, using=using)
        return
    params = [_db_value(f, v, connection) for f, v in zip(targets, raw, strict=True)]
    params.append(model._meta.pk.get_db_prep_value(obj.pk, connection))
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        updated = cursor.rowcount
    if updated == 0:
        raise DatabaseError("Save with update_fields did not affect any rows.")
    obj._state.db = using


# --- several writes in one statement -------------------------------------------------------------
#
# A turn's placement wrote the thread, the message and its activity in three statements, and its
# finish the reply and the two rows it completes in two: each a round trip and the per-statement work
# of both sides. ``write_together`` sends them as one statement of data-modifying CTEs. What makes
# that safe: PostgreSQL runs the whole statement or none of it; the sub-statements cannot see each
# other's rows, but the writes here do not read, they only set values computed in Python; and
# Django's foreign keys on PostgreSQL are ``DEFERRABLE INITIALLY DEFERRED``, checked at commit, so
# a row may reference one inserted in a sibling CTE (or in a later statement of the transaction).
# Unique and check constraints are immediate: a violation fails the statement (nothing of it is
# written) with an ``IntegrityError``, as the separate statements did.


class Insert:
    """New rows of one model, inserted in this order (one multi-row ``INSERT``: each row's values,
    ``auto_now_add`` times included, are computed in order, and serial keys are drawn in order)."""

    __slots__ = ("objs",)

    def __init__(self, *objs: Any) -> None:
        if not objs or len({type(o) for o in objs}) != 1:
            raise ValueError("Insert takes one or more unsaved instances of one model")
        self.objs = objs


class Update:
    """``obj.save(update_fields=fields)``: an error if its row is gone, as with the ORM."""

    __slots__ = ("fields", "obj")

    def __init__(self, obj: Any, fields: list[str] | tuple[str, ...]) -> None:
        self.obj, self.fields = obj, tuple(fields)


class Increment:
    """``QuerySet.filter(pk__in=pks).update(field=F(field) + 1, **values)``: a count kept on rows others
    may delete meanwhile, so a row that is gone is skipped, not an error. Its rows must not be ones
    another write of the statement updates (PostgreSQL leaves two updates of a row undefined)."""

    __slots__ = ("field", "model", "pks", "values")

    def __init__(self, model: Any, pks: Any, *, field: str, values: dict[str, Any] | None = None) -> None:
        self.model, self.pks, self.field, self.values = model, tuple(pks), field, dict(values or {})
        if not self.pks:
            raise ValueError("Increment needs at least one key")


Write = Insert | Update | Increment


def _write_one_by_one(writes: tuple[Write, ...], using: str) -> None:
    """The ORM's path for each write, in order (a model with save signals, an expression value,
    another database)."""
    with transaction.atomic(using=using):
        for write in writes:
            if isinstance(write, Insert):
                for obj in write.objs:
                    obj.save(force_insert=True, using=using)
            elif isinstance(write, Increment):
                write.model._default_manager.using(using).filter(pk__in=write.pks).update(
                    **{write.field: F(write.field) + 1}, **write.values
                )
            else:
                write.obj.save(update_fields=list(write.fields), using=using)


# What a guarded statement's update of no row raises (``1 / count(*)``): PostgreSQL's division_by_zero.
_NO_ROW_SQLSTATE = "22012"
_NO_ROW = "Save with update_fields did not affect any rows."


def _together_sql(
    shapes: tuple[Hashable, ...], writes: tuple[Write, ...], connection: Any, *, guarded: bool = False
) -> tuple[str, Any]:
    """The statement for these writes' shapes: one CTE each, and a SELECT of each insert's returned
    columns (an array per column, rows in insertion order) and each update's row count. ``guarded``:
    each update's count is ``1 / count(*)`` instead, so an update of no row fails the statement
    itself (and with it every write) rather than a check after it."""
    key = ("together", shapes, connection.alias, guarded)
    if (cached := _write_sql.get(key)) is not None:
        return cached[0], cached[1]
    qn = connection.ops.quote_name
    ctes: list[str] = []
    outputs: list[str] = []
    layout: list[tuple[list[Any], list[Any]]] = []  # per write: its fields, its returned fields
    for i, write in enumerate(writes):
        name = f"w{i}"
        if isinstance(write, Insert):
            model = type(write.objs[0])
            opts = model._meta
            pk_set = write.objs[0].pk is not None
            fields = [f for f in opts.local_concrete_fields if pk_set or f is not opts.pk]
            returning = list(opts.db_returning_fields)
            row = "(" + ", ".join(["%s"] * len(fields)) + ")"
            body = (
                f"INSERT INTO {qn(opts.db_table)} ({', '.join(qn(f.column) for f in fields)}) VALUES "
                + ", ".join([row] * len(write.objs))
                + f" RETURNING {', '.join(qn(f.column) for f in returning) or '1'}"
            )
            outputs += [f"(SELECT array_agg({qn(f.column)}) FROM {name})" for f in returning]
        elif isinstance(write, Increment):
            opts = write.model._meta
            counted = qn(opts.get_field(write.field).column)
            fields = [opts.get_field(n) for n in write.values]
            returning = []
            body = (
                f"UPDATE {qn(opts.db_table)} SET {counted} = {counted} + 1"
                + "".join(f", {qn(f.column)} = %s" for f in fields)
                + f" WHERE {qn(opts.pk.column)} = ANY(%s) RETURNING 1"
            )
            outputs.append(f"(SELECT count(*) FROM {name})")  # never guarded: gone rows are no error
        else:
            model = type(write.obj)
            opts = model._meta
            fields = [opts.get_field(n) for n in write.fields]
            returning = []
            body = (
                f"UPDATE {qn(opts.db_table)} SET "
                + ", ".join(f"{qn(f.column)} = %s" for f in fields)
                + f" WHERE {qn(opts.pk.column)} = %s RETURNING 1"
            )
            outputs.append(f"(SELECT {'1 / ' if guarded else ''}count(*) FROM {name})")
        ctes.append(f"{name} AS ({body})")
        layout.append((fields, returning))
    sql = "WITH " + ", ".join(ctes) + " SELECT " + (", ".join(outputs) or "1")
    _write_sql[key] = (sql, layout, [])
    return sql, layout


def write_together(*writes: Write, using: str = "default") -> None:
    """Run ``writes`` (``Insert`` of new instances, ``Update`` of saved ones, ``Increment`` of counts)
    as one statement.

    The same rows and values as ``create`` / ``save_fields`` one by one, in one round trip: inserted
    instances get their database-generated keys and count as saved; an update of a row that is gone
    raises ``DatabaseError`` and stores none of the writes (in autocommit the statement is its own
    transaction, with no ``BEGIN``/``COMMIT`` around it; in a transaction, the caller's rolls back
    with it). A foreign key
    may point at a row inserted by another of the writes (checked at commit). One row may be
    updated at most once (PostgreSQL leaves two updates of a row in one statement undefined).
    Models with save signal receivers (and the other cases ``create`` leaves to the ORM), and
    values that are expressions, are written one by one through the ORM instead.
    """
    if not writes:
        return
    connection = connections[using]
    plain = connection.vendor == "postgresql"
    updated = set()
    for write in writes:
        if isinstance(write, Increment):
            model = write.model
            names = model._meta._non_pk_concrete_field_names
            if not names.issuperset([write.field, *write.values]):
                raise ValueError(f"Increment needs fields of {model.__name__}'s own")
            plain = (
                plain
                and _plain_model(model)
                and all(model._meta.get_field(n).model is model for n in [write.field, *write.values])
            )
            continue
        objs = write.objs if isinstance(write, Insert) else (write.obj,)
        model = type(objs[0])
        plain = plain and _plain_model(model)
        if isinstance(write, Update):
            names = model._meta._non_pk_concrete_field_names
            if write.obj.pk is None or not write.fields or not names.issuperset(write.fields):
                raise ValueError(f"Update needs a saved {model.__name__} and fields of its own")
            if (model, write.obj.pk) in updated:
                raise ValueError(f"one {model.__name__} row updated twice in one statement")
            updated.add((model, write.obj.pk))
            plain = plain and all(model._meta.get_field(n).model is model for n in write.fields)
        for obj in objs:
            obj._prepare_related_fields_for_save(operation_name="save")
    if not plain:
        _write_one_by_one(writes, using)
        return
    shapes = tuple(
        ("insert", type(w.objs[0]), w.objs[0].pk is not None, len(w.objs))
        if isinstance(w, Insert)
        else ("increment", w.model, w.field, tuple(w.values))
        if isinstance(w, Increment)
        else ("update", type(w.obj), w.fields)
        for w in writes
    )
    # In autocommit (no transaction of the caller's), the statement is its own transaction: its
    # updates are guarded in SQL, so no BEGIN and COMMIT round trips are needed around it for an
    # update of a gone row to roll the other writes back. In a transaction, the check runs after the
    # statement, as a Python error: the caller's transaction stays usable.
    guarded = not connection.in_atomic_block and connection.get_autocommit()
    sql, layout = _together_sql(shapes, writes, connection, guarded=guarded)
    params: list[Any] = []
    for write, (fields, _) in zip(writes, layout, strict=True):
        if isinstance(write, Insert):
            for obj in write.objs:
                raw = [f.pre_save(obj, add=True) for f in fields]
                if _has_expression(raw):
                    _write_one_by_one(writes, using)
                    return
                params += [_db_value(f, v, connection) for f, v in zip(fields, raw, strict=True)]
        elif isinstance(write, Increment):
            raw = list(write.values.values())
            if _has_expression(raw):
                _write_one_by_one(writes, using)
                return
            params += [_db_value(f, v, connection) for f, v in zip(fields, raw, strict=True)]
            pk = write.model._meta.pk
            params.append([pk.get_db_prep_value(pk.to_python(k), connection) for k in write.pks])
        else:
            obj = write.obj
            raw = [f.pre_save(obj, add=False) for f in fields]
            if _has_expression(raw):
                _write_one_by_one(writes, using)
                return
            params += [_db_value(f, v, connection) for f, v in zip(fields, raw, strict=True)]
            params.append(obj._meta.pk.get_db_prep_value(obj.pk, connection))
    # No savepoint of its own: in the caller's transaction, an error below rolls back the caller's
    # writes too; in autocommit, the guarded statement is the transaction.
    with contextlib.nullcontext() if guarded else transaction.atomic(using=using, savepoint=False):
        with connection.cursor() as cursor:
            try:
                cursor.execute(sql, params)
            except DataError as exc:
                if guarded and getattr(exc.__cause__, "sqlstate", None) == _NO_ROW_SQLSTATE:
                    raise DatabaseError(_NO_ROW) from None
                raise
            row = iter(cursor.fetchone())
        # Each write's outputs, in the SELECT's order: an update's row count, an insert's arrays.
        outputs = [
            [next(row) for _ in lay[1]] if isinstance(w, Insert) else next(row)
            for w, lay in zip(writes, layout, strict=True)
        ]
        if any(isinstance(w, Update) and out == 0 for w, out in zip(writes, outputs, strict=True)):
            raise DatabaseError(_NO_ROW)
    for write, (_, returning), out in zip(writes, layout, outputs, strict=True):
        if isinstance(write, Update):
            write.obj._state.db = using
            continue
        if isinstance(write, Increment):
            continue
        for field, values in zip(returning, out, strict=True):
            for obj, value in zip(write.objs, values, strict=True):
                for converter in field.get_db_converters(connection):
                    value = converter(value, field, connection)
                setattr(obj, field.attname, value)
        for obj in write.objs:
            obj._state.adding, obj._state.db = False, using
