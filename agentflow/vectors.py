"""pgvector's ``vector`` columns, read and written with less CPU on both sides of the connection.

pgvector's Django field reads a vector as PostgreSQL's text form (``[0.0123,-0.0456,...]``: 384
``float()`` calls in Python, 384 shortest-decimal conversions in PostgreSQL) and writes one by
``repr``-ing each float (~0.2 ms for 384 dimensions). A turn reads about 15 vectors (three per
candidate thread) and writes three or four. This field keeps pgvector's column type, lookups and
migrations (it deconstructs as pgvector's field) and changes only the transfer:

* reads select ``vector_send(column)``, pgvector's binary form (a 4-byte header, then big-endian
  float32s), which psycopg hands over as ``bytes``; the list is made in one numpy call. The values
  are the stored float32s exactly (the text form gave the doubles nearest their shortest decimals:
  the same float32s, different doubles in the last bits).
* numpy arrays are written as text with ``%.9g`` per dimension in one formatting call (nine
  significant digits give back every float32 exactly); lists and pgvector ``Vector`` objects take
  pgvector's own path, as before.
* where the parameter's place gives its type (``agentflow.prepared``'s INSERT and UPDATE of a
  column, ``CosineDistance``'s ``<=>``), an array goes in pgvector's binary form instead
  (``vector_param``: the header, then the big-endian float32s; one numpy call, ~1 us for 384
  dimensions instead of ~75 us of text formatting, and PostgreSQL's ``vector_recv`` copies what
  ``vector_in`` parsed as 384 decimals), as a binary parameter of no declared type, on a
  connection that binds parameters on the server (``server_side_binding``, the product's default).
  The field itself keeps the text: Django puts a field's values into places whose type PostgreSQL
  cannot infer (``bulk_update``'s ``CASE``, ``bulk_create``'s ``UNNEST`` arrays).

``CosineDistance`` is pgvector's, with an array written the binary way (or as text, see above).

Raw SQL (``QuerySet.raw``, a column read inside a subquery) still gets the text form, which
``vector_from_db`` reads too.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
from django.db.models import Value
from pgvector import Vector
from pgvector.django import CosineDistance as _PgCosineDistance
from pgvector.django import VectorField as _PgVectorField

_HEADER = struct.Struct(">HH")
_BIG_ENDIAN_FLOAT32 = np.dtype(">f4")
_templates: dict[int, str] = {}


class BinaryVector(bytes):
    """pgvector's binary form of a vector (``vector_recv``'s input), sent as a binary parameter of no
    declared type: PostgreSQL takes the type from where the parameter stands (a ``vector`` column,
    the ``<=>`` operator, a ``::vector`` cast). Where nothing gives the type, PostgreSQL reads it as
    text and fails loudly ("invalid byte sequence"), never silently."""

    __slots__ = ()


def _register_binary_dumper() -> bool:
    """Teach psycopg (3) to send ``BinaryVector`` as it is: binary format, type left to the server.
    Registered on psycopg's global adapters, which every connection made afterwards copies (the
    models import this module before any connection opens)."""
    try:
        import psycopg
        from psycopg.adapt import Dumper
        from psycopg.pq import Format
    except ImportError:  # psycopg2: vectors go as text
        return False

    class _BinaryVectorDumper(Dumper):
        format = Format.BINARY
        oid = 0  # unknown: inferred by the server

        def dump(self, obj: Any) -> bytes:
            return bytes(obj)

    psycopg.adapters.register_dumper(BinaryVector, _BinaryVectorDumper)
    return True


_BINARY_DUMPER = _register_binary_dumper()


def vector_to_binary(value: np.ndarray) -> BinaryVector:
    """A one-dimensional array in pgvector's binary form (float32, as the column stores it)."""
    return BinaryVector(_HEADER.pack(len(value), 0) + value.astype(_BIG_ENDIAN_FLOAT32, copy=False).tobytes())


def binds_on_server(connection: Any) -> bool:
    """Whether ``connection`` (Django's) sends parameters apart from the SQL, with psycopg 3: then a
    parameter may be binary. Client-side binding (``server_side_binding`` off, e.g. behind
    PgBouncer) writes every parameter into the SQL text."""
    return (
        _BINARY_DUMPER
        and connection.vendor == "postgresql"
        and connection.settings_dict["OPTIONS"].get("server_side_binding") is True
    )


def vector_param(value: Any, connection: Any) -> Any:
    """A vector as a query parameter for ``connection``: binary for an array where the connection
    binds on the server (``binds_on_server``), otherwise ``vector_to_db``'s text."""
    if isinstance(value, np.ndarray) and value.ndim == 1 and binds_on_server(connection):
        return vector_to_binary(value)
    return vector_to_db(value)


def vector_to_db(value: Any) -> str | None:
    """A vector's text form for PostgreSQL: what pgvector sends, formatted in one call for an array.

    Raises:
        ValueError: not a vector (pgvector's own message), or an array that is not one-dimensional.
    """
    if isinstance(value, np.ndarray) and value.ndim == 1:
        floats = value.astype(np.float32, copy=False).tolist()
        template = _templates.get(len(floats))
        if template is None:
            template = _templates.setdefault(len(floats), "[" + ",".join(["%.9g"] * len(floats)) + "]")
        return template % tuple(floats)
    return Vector._to_db(value)


def vector_from_db(value: Any) -> list[float] | None:
    """A vector column's value as the list of floats pgvector's field returns.

    Takes pgvector's binary form (``bytes`` or ``memoryview``, from ``vector_send``), its text form
    (``str``), a ``Vector`` or ``None``.

    Raises:
        ValueError: binary data whose length does not match its dimension count.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        dimensions, unused = _HEADER.unpack_from(value)
        if len(value) != _HEADER.size + 4 * dimensions or unused != 0:
            raise ValueError(f"not a pgvector binary vector of {dimensions} dimensions ({len(value)} bytes)")
        floats: list[float] = np.frombuffer(value, _BIG_ENDIAN_FLOAT32, offset=_HEADER.size).tolist()
        return floats
    return Vector._from_db(value)


def array_from_db(value: Any) -> np.ndarray | None:
    """A vector column's value as a float32 numpy array (its own writable copy): the same float32s
    ``vector_from_db`` gives as a list, without the list (384 Python floats made, then read back
    by ``np.asarray`` where the caller computes with them)."""
    if isinstance(value, bytes | bytearray | memoryview):
        dimensions, unused = _HEADER.unpack_from(value)
        if len(value) != _HEADER.size + 4 * dimensions or unused != 0:
            raise ValueError(f"not a pgvector binary vector of {dimensions} dimensions ({len(value)} bytes)")
        return np.frombuffer(value, _BIG_ENDIAN_FLOAT32, offset=_HEADER.size).astype(np.float32)
    floats = Vector._from_db(value)
    return None if floats is None else np.asarray(floats, dtype=np.float32)


class VectorField(_PgVectorField):
    """pgvector's ``VectorField`` with the binary read and the fast write described above."""

    def deconstruct(self) -> tuple[Any, Any, Any, Any]:
        # Migrations keep naming pgvector's field: the column and its SQL are the same.
        name, _path, args, kwargs = super().deconstruct()
        return name, "pgvector.django.vector.VectorField", args, kwargs

    def select_format(self, compiler: Any, sql: str, params: Any) -> tuple[str, Any]:
        if getattr(compiler.query, "subquery", False):
            return sql, params  # the outer query compares or selects the vector itself
        return f"vector_send({sql})", params

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> list[float] | None:
        return vector_from_db(value)

    def get_prep_value(self, value: Any) -> str | None:
        return vector_to_db(value)

    def value_to_string(self, obj: Any) -> str:
        # Serialisation (dumpdata, exports) keeps pgvector's text.
        stored: Any = self.value_from_object(obj)
        value = Vector._to_db(stored)
        return "" if value is None else value


class ArrayVectorField(VectorField):
    """The output field of an expression that reads a vector column as a float32 array
    (``array_from_db``) for code that computes with it; not for model fields (those keep lists)."""

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> Any:
        return array_from_db(value)


class _VectorValue(Value):
    """An array argument as ``vector_param`` writes it for the query's connection. Holds the binary
    form (hashable, comparable: the expression's identity), and gives the text form where the
    connection binds parameters in the SQL."""

    def as_sql(self, compiler: Any, connection: Any) -> Any:
        if binds_on_server(connection):
            return "%s", [self.value]
        dimensions = _HEADER.unpack_from(self.value)[0]
        array = np.frombuffer(self.value, _BIG_ENDIAN_FLOAT32, count=dimensions, offset=_HEADER.size)
        return "%s", [vector_to_db(array)]


class CosineDistance(_PgCosineDistance):
    """pgvector's ``CosineDistance`` (``<=>``), an array argument written by ``vector_param``."""

    def __init__(self, expression: Any, vector: Any, /, **extra: Any) -> None:
        if isinstance(vector, np.ndarray) and vector.ndim == 1:
            vector = _VectorValue(vector_to_binary(vector))
            self._constructor_args = ((expression, vector), extra)  # hashable: the bytes, not the array
        super().__init__(expression, vector, **extra)
