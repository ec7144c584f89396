"""Statements are bound on the server and prepared after their second run on a connection
(``AGENTFLOW_DB_PREPARED_STATEMENTS``): PostgreSQL then neither parses nor plans them again."""

from __future__ import annotations

import numpy as np
import pytest
from django.db import connection

from agentflow.vectors import CosineDistance
from conversations.models import EndUser
from memory.models import Memory


def _prepared() -> list[str]:
    with connection.cursor() as cursor:
        cursor.execute("SELECT statement FROM pg_prepared_statements")
        return [row[0] for row in cursor.fetchall()]


@pytest.mark.django_db
def test_a_statement_run_twice_on_a_connection_is_prepared() -> None:
    list(EndUser.objects.filter(external_id="prepared-nobody"))
    assert not any("prepared-nobody" in s or '"external_id" = $1' in s for s in _prepared())

    list(EndUser.objects.filter(external_id="prepared-nobody-2"))
    list(EndUser.objects.filter(external_id="prepared-nobody-3"))

    statements = [s for s in _prepared() if '"external_id" = $1' in s]
    assert len(statements) == 1  # one statement, its parameters bound apart: no value in its text
    assert "prepared-nobody" not in statements[0]


@pytest.mark.django_db
def test_a_vector_parameter_is_bound_on_the_server_in_a_similarity_query() -> None:
    """pgvector's text form goes as a parameter of unknown type; PostgreSQL types it as ``vector``."""
    query = np.zeros(384, dtype=np.float32)
    query[0] = 1.0
    for _ in range(3):
        rows = list(
            Memory.objects.annotate(distance=CosineDistance("embedding", query)).order_by("distance")[:3]
        )
        assert rows == []
    assert any("<=>" in s for s in _prepared())
