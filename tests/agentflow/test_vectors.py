"""Vector columns read in pgvector's binary form and written with one formatting call
(agentflow.vectors): the same stored values and the same float32s as pgvector's own field."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from django.db import DataError, connection, transaction
from pgvector import Vector
from pgvector.django import CosineDistance

from agentflow.vectors import (
    BinaryVector,
    VectorField,
    vector_from_db,
    vector_param,
    vector_to_binary,
    vector_to_db,
)
from agentflow.vectors import CosineDistance as OurCosineDistance
from conversations.models import EMBEDDING_DIMENSIONS, Thread
from memory.models import Memory
from tests.conversations.factories import ThreadFactory

pytestmark = pytest.mark.django_db

RNG = np.random.default_rng(7)


def _unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(EMBEDDING_DIMENSIONS).astype(np.float32)
    return v / np.float32(np.linalg.norm(v))


def _awkward() -> np.ndarray:
    """Values whose text forms are long or unusual: subnormals, extremes, negative zero, ties."""
    v = RNG.standard_normal(EMBEDDING_DIMENSIONS).astype(np.float32)
    v[:8] = [1e-45, -1e-45, 1.17549435e-38, 3.4028235e38, -3.4028235e38, -0.0, 0.1, 1 / 3]
    v[8:40] = RNG.random(32).astype(np.float32) * np.float32(1e-30)
    return v


def _stored_text(pk: object, column: str) -> str:
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT {column}::text FROM conversations_thread WHERE id = %s", [pk])
        return cursor.fetchone()[0]


@pytest.mark.parametrize("make", [lambda: _unit(1), _awkward, lambda: _unit(2).astype(np.float64)])
def test_a_written_array_is_stored_as_pgvectors_text_would_store_it(make) -> None:  # type: ignore[no-untyped-def]
    v = make()
    thread = ThreadFactory(topic_embedding=v)

    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT topic_embedding = %s::vector FROM conversations_thread WHERE id = %s",
            [Vector._to_db(v), thread.pk],
        )
        assert cursor.fetchone()[0] is True
    assert np.array_equal(
        np.float32(Vector._from_db(_stored_text(thread.pk, "topic_embedding"))), v.astype(np.float32)
    )


def test_a_read_vector_is_the_stored_float32s_and_the_same_as_pgvectors_text_read() -> None:
    v = _awkward()
    thread = ThreadFactory(topic_embedding=v, opening_embedding=_unit(3), last_user_embedding=None)

    loaded = Thread.objects.get(pk=thread.pk)
    assert isinstance(loaded.topic_embedding, list)
    assert loaded.topic_embedding == v.tolist()  # exactly the float32 values
    text_read = Vector._from_db(_stored_text(thread.pk, "topic_embedding"))
    assert np.array_equal(np.float32(loaded.topic_embedding), np.float32(text_read))
    assert loaded.opening_embedding == _unit(3).tolist()
    assert loaded.last_user_embedding is None
    row = Thread.objects.filter(pk=thread.pk).values("topic_embedding", "last_user_embedding").get()
    assert row == {"topic_embedding": v.tolist(), "last_user_embedding": None}


def test_none_and_lists_and_vectors_are_written_as_before() -> None:
    field = VectorField(dimensions=3)
    assert field.get_prep_value(None) is None
    assert field.get_prep_value([1, 2.5, -3]) == Vector._to_db([1, 2.5, -3]) == "[1.0,2.5,-3.0]"
    assert field.get_prep_value(Vector([1.0, 2.0, 3.0])) == Vector._to_db(Vector([1.0, 2.0, 3.0]))
    assert vector_to_db(np.array([0.5, -0.0, 2], dtype=np.float32)) == "[0.5,-0,2]"
    with pytest.raises(ValueError, match="expected ndim to be 1"):
        field.get_prep_value(np.zeros((2, 2), dtype=np.float32))


def test_a_vector_of_the_wrong_dimension_is_refused_by_the_column() -> None:
    thread = ThreadFactory()
    thread.topic_embedding = np.ones(3, dtype=np.float32)
    with pytest.raises(DataError, match="expected 384 dimensions, not 3"), transaction.atomic():
        thread.save(update_fields=["topic_embedding"])


def test_binary_values_are_checked_and_text_still_reads() -> None:
    good = struct.pack(">HH", 2, 0) + np.array([1.5, -2], dtype=">f4").tobytes()
    assert vector_from_db(good) == [1.5, -2.0]
    assert vector_from_db(memoryview(good)) == [1.5, -2.0]
    assert vector_from_db("[1.5,-2]") == [1.5, -2.0]
    assert vector_from_db(None) is None
    with pytest.raises(ValueError, match="not a pgvector binary vector of 3 dimensions"):
        vector_from_db(good[:4].replace(b"\x00\x02", b"\x00\x03", 1) + good[4:])
    with pytest.raises(ValueError, match="not a pgvector binary vector"):
        vector_from_db(struct.pack(">HH", 2, 1) + good[4:])


def test_subqueries_and_raw_sql_see_the_vector_itself() -> None:
    v = _unit(4)
    thread, other = ThreadFactory(topic_embedding=v), ThreadFactory(topic_embedding=_unit(5))

    same = Thread.objects.filter(
        topic_embedding__in=Thread.objects.filter(pk=thread.pk).values("topic_embedding")
    )
    assert list(same.values_list("pk", flat=True)) == [thread.pk]
    raw = next(iter(Thread.objects.raw("SELECT * FROM conversations_thread WHERE id = %s", [other.pk])))
    assert np.array_equal(np.float32(raw.topic_embedding), _unit(5))


def test_similarities_are_the_same_as_with_pgvectors_text() -> None:
    query, near, far = _unit(6), _unit(6) + np.float32(0.05) * _unit(7), _unit(8)
    agent = ThreadFactory().user.agent
    for i, v in enumerate((near, far)):
        Memory.objects.create(agent=agent, kind="fact", content=f"m{i}", embedding=v, embedding_model="test")

    ours = list(
        Memory.objects.annotate(d=CosineDistance("embedding", query))
        .order_by("d")
        .values_list("d", flat=True)
    )
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT embedding <=> %s::vector AS d FROM memory_memory ORDER BY d", [Vector._to_db(query)]
        )
        before = [row[0] for row in cursor.fetchall()]
        cursor.execute(
            "SELECT embedding <=> %s::vector AS d FROM memory_memory ORDER BY d", [vector_to_db(query)]
        )
        after = [row[0] for row in cursor.fetchall()]
    assert ours == before == after
    # Ours sends the query vector in binary (the tests bind on the server, as the product does).
    binary = list(
        Memory.objects.annotate(d=OurCosineDistance("embedding", query))
        .order_by("d")
        .values_list("d", flat=True)
    )
    assert binary == before


def test_arrays_go_in_binary_where_the_connection_binds_on_the_server_and_as_text_elsewhere() -> None:
    from types import SimpleNamespace

    assert connection.settings_dict["OPTIONS"].get("server_side_binding") is True
    v = _awkward()
    sent = vector_param(v, connection)
    assert isinstance(sent, BinaryVector) and sent == vector_to_binary(v)
    assert vector_from_db(bytes(sent)) == v.tolist()
    field = Thread._meta.get_field("topic_embedding")
    # The field keeps the text: Django puts its values where PostgreSQL cannot tell their type.
    assert field.get_db_prep_save(v, connection=connection) == vector_to_db(v)
    client_side = SimpleNamespace(vendor="postgresql", settings_dict={"OPTIONS": {}})
    assert vector_param(v, client_side) == vector_to_db(v)
    compiled = OurCosineDistance("embedding", v).get_source_expressions()[1]
    assert compiled.as_sql(None, client_side) == ("%s", [vector_to_db(v)])
    assert compiled.as_sql(None, connection) == ("%s", [vector_to_binary(v)])


def test_prepared_writes_store_an_array_in_binary_as_the_orm_stores_its_text() -> None:
    from agentflow import prepared

    v, w = _awkward(), _unit(10).astype(np.float64) / 3
    by_orm = ThreadFactory(topic_embedding=v, opening_embedding=w)
    ours = ThreadFactory()
    ours.topic_embedding, ours.opening_embedding = v, w
    sent: list[object] = []

    def spy(execute, sql, params, many, context):  # type: ignore[no-untyped-def]
        sent.extend(params)
        return execute(sql, params, many, context)

    with connection.execute_wrapper(spy):
        prepared.save_fields(ours, ["topic_embedding", "opening_embedding"])
    assert [type(p) for p in sent[:2]] == [BinaryVector, BinaryVector]
    for column in ("topic_embedding", "opening_embedding"):
        assert _stored_text(ours.pk, column) == _stored_text(by_orm.pk, column)
    created = prepared.create(
        Thread,
        user=by_orm.user,
        session=by_orm.session,
        topic="t",
        topic_embedding=v,
        opening_embedding=w,
        last_user_embedding=v,
        last_activity_at=by_orm.last_activity_at,
    )
    assert _stored_text(created.pk, "last_user_embedding") == _stored_text(by_orm.pk, "topic_embedding")
    assert _stored_text(created.pk, "opening_embedding") == _stored_text(by_orm.pk, "opening_embedding")
    # bulk_update (a CASE whose type PostgreSQL cannot infer) still works: the field writes text.
    ours.topic_embedding = w
    Thread.objects.bulk_update([ours], ["topic_embedding"])
    assert _stored_text(ours.pk, "topic_embedding") == _stored_text(by_orm.pk, "opening_embedding")


def test_a_binary_vector_where_nothing_gives_its_type_fails_loudly() -> None:
    with pytest.raises(DataError), transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SELECT %s", [vector_to_binary(_unit(9))])


def test_migrations_still_name_pgvectors_field() -> None:
    _name, path, _args, kwargs = Thread._meta.get_field("topic_embedding").deconstruct()
    assert path == "pgvector.django.vector.VectorField"
    assert kwargs["dimensions"] == EMBEDDING_DIMENSIONS
