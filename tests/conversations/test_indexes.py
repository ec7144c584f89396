"""The tables of our apps carry no index that another index of the same table already covers.

Every index is written on each insert and each update that changes one of its columns, so one that a
composite index starting with the same columns makes redundant costs CPU and WAL on every turn
(docs/operations.md, "PostgreSQL's CPU per turn on the production path").
"""

from __future__ import annotations

import pytest
from django.apps import apps
from django.db import connection

pytestmark = pytest.mark.django_db

# Plain btree indexes of a table: name, key columns with their operator classes (INCLUDE columns
# apart; a varchar_pattern_ops index serves LIKE, which the default class does not), unique, partial.
INDEXES_SQL = """
SELECT c.relname,
       (SELECT array_agg(a.attname || ' ' || o.opcname ORDER BY k.n)
          FROM unnest(i.indkey[0:i.indnkeyatts - 1], i.indclass[0:i.indnkeyatts - 1])
               WITH ORDINALITY AS k(attnum, opclass, n)
          JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
          JOIN pg_opclass o ON o.oid = k.opclass),
       i.indisunique,
       i.indpred IS NOT NULL
  FROM pg_index i
  JOIN pg_class c ON c.oid = i.indexrelid
  JOIN pg_am am ON am.oid = c.relam
 WHERE i.indrelid = %s::regclass AND am.amname = 'btree' AND i.indexprs IS NULL
"""


def covered_indexes(table: str) -> list[str]:
    """The table's non-unique, non-partial btree indexes whose key columns begin another plain
    (non-partial) btree index's key columns, each with the index that covers it."""
    with connection.cursor() as cursor:
        cursor.execute(INDEXES_SQL, [table])
        rows = cursor.fetchall()
    found = []
    for name, columns, unique, partial in rows:
        if unique or partial:
            continue
        for other, other_columns, _, other_partial in rows:
            if other == name or other_partial or len(other_columns) < len(columns):
                continue
            if other_columns[: len(columns)] == columns and (
                len(other_columns) > len(columns) or other < name
            ):
                found.append(f"{table}.{name} {columns} is covered by {other} {other_columns}")
                break
    return found


@pytest.mark.parametrize("app", ["conversations", "memory", "intents"])
def test_no_table_of_ours_has_a_covered_index(app):
    tables = [model._meta.db_table for model in apps.get_app_config(app).get_models()]
    assert tables
    assert [line for table in tables for line in covered_indexes(table)] == []


def test_a_covered_index_is_found():
    """The check itself: an index that a composite one starts with is reported, a lone one is not."""
    with connection.cursor() as cursor:
        cursor.execute('CREATE INDEX "probe_kind_only" ON "memory_memory" ("kind")')
        assert covered_indexes("memory_memory") == []
        cursor.execute('CREATE INDEX "probe_user_only" ON "memory_memory" ("user_id")')
        found = covered_indexes("memory_memory")
    assert len(found) == 1 and found[0].startswith("memory_memory.probe_user_only")


def test_the_covering_indexes_are_there():
    """What the dropped indexes served, the composite ones serve: they must stay."""
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT indexdef FROM pg_indexes WHERE tablename IN ('conversations_message',"
            " 'conversations_enduser', 'conversations_chatsession', 'conversations_thread',"
            " 'conversations_threadactivity')"
        )
        defs = {" ".join(row[0].split(" USING ")[1:]) for row in cursor.fetchall()}
    for expected in (
        "btree (agent_id, external_id)",
        "btree (user_id, last_activity_at DESC)",
        "btree (user_id, status, last_activity_at DESC)",
        "btree (user_id, created_at)",
        "btree (thread_id, created_at)",
        "btree (created_at) INCLUDE (user_id, role, status, offline, intent)",
    ):
        assert expected in defs
