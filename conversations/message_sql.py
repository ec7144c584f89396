"""A user message's SQL on the web side: the snapshot its checks need, and the one statement that
stores it in a live session (``conversations.services.message_receive`` decides which to run).

Both are written out once per process and database alias (quoting is the vendor's), from the
models' fields: no queryset is built or compiled per message (docs/operations.md, "Web process CPU").
"""

from __future__ import annotations

import functools
import re
from datetime import datetime, timedelta
from typing import Any, NamedTuple

from django.db import connection

from agentflow import prepared

from .models import Agent, ChatSession, EndUser, Message


class Snapshot(NamedTuple):
    """What storing a message needs to know, read in one statement (``message_snapshot``)."""

    agent_version: int
    user: EndUser | None  # the agent's end user of this external id, if any
    session: ChatSession | None  # their live session, if any
    duplicate: Message | None  # their message with this client id (a resend's first copy), if any

    @property
    def duplicate_id(self) -> Any:
        return None if self.duplicate is None else self.duplicate.pk


def _columns(model: Any) -> list[Any]:
    return list(model._meta.concrete_fields)


def _snapshot_select(conn: Any) -> str:
    """The snapshot's ``SELECT``: the agent's version, then the user's, the live session's and the
    earlier copy's columns (``_snapshot_of`` reads them by position)."""
    qn = conn.ops.quote_name

    def out(alias: str, model: Any) -> str:
        return ", ".join(f"{alias}.{qn(f.column)}" for f in _columns(model))

    m, s = Message._meta, ChatSession._meta
    return (
        f"SELECT a.{qn('version')}, {out('u', EndUser)}, {out('s', ChatSession)}, {out('d', Message)}"
        f" FROM {qn(Agent._meta.db_table)} a"
        f" LEFT JOIN {qn(EndUser._meta.db_table)} u ON u.{qn('agent_id')} = a.{qn('id')}"
        f" AND u.{qn('external_id')} = %(external_id)s"
        f" LEFT JOIN LATERAL (SELECT s0.* FROM {qn(s.db_table)} s0"
        f" WHERE s0.{qn('user_id')} = u.{qn('id')} AND s0.{qn('status')} = %(active)s"
        f" AND s0.{qn('expires_at')} > %(now)s"
        f" ORDER BY s0.{qn('last_activity_at')} DESC LIMIT 1) s ON TRUE"
        f" LEFT JOIN LATERAL (SELECT m0.* FROM {qn(m.db_table)} m0"
        f" WHERE m0.{qn('user_id')} = u.{qn('id')} AND m0.{qn('client_message_id')} = %(client_id)s"
        f" AND m0.{qn('client_message_id')} <> '' ORDER BY m0.{qn(m.pk.column)} LIMIT 1) d ON TRUE"
        f" WHERE a.{qn('id')} = %(agent_id)s"
    )


def _snapshot_names() -> tuple[dict[str, str], int]:
    """The store statement's names for the snapshot's columns (``c<position>``), by ``<u|s|d>_<column>``
    (and ``a_version``), and how many columns there are."""
    names: dict[str, str] = {"a_version": "c0"}
    position = 1
    for prefix, model in (("u", EndUser), ("s", ChatSession), ("d", Message)):
        for f in _columns(model):
            names[f"{prefix}_{f.column}"] = f"c{position}"
            position += 1
    return names, position


# Per model and database alias: the attribute names, and the positions whose fields convert values.
_row_layouts: dict[tuple[Any, str], tuple[list[str], list[tuple[int, list[Any]]]]] = {}


def _from_row(model: Any, values: tuple[Any, ...], conn: Any) -> Any:
    """A model instance from its columns as the driver returned them (with the fields' converters)."""
    if (layout := _row_layouts.get((model, conn.alias))) is None:
        fields = _columns(model)
        converting = [(i, found) for i, f in enumerate(fields) if (found := f.get_db_converters(conn))]
        layout = _row_layouts[(model, conn.alias)] = ([f.attname for f in fields], converting)
    names, converting = layout
    if len(values) != len(names):
        raise ValueError(f"{model.__name__}: {len(values)} values for {len(names)} columns")
    converted = list(values)
    for i, converters in converting:
        for converter in converters:
            converted[i] = converter(converted[i], None, conn)
    return model.from_db(conn.alias, names, converted)


@functools.cache
def _counts() -> tuple[int, int, int]:
    return len(_columns(EndUser)), len(_columns(ChatSession)), len(_columns(Message))


def _snapshot_of(row: tuple[Any, ...], conn: Any) -> Snapshot:
    n_user, n_session, n_message = _counts()
    user_values = row[1 : 1 + n_user]
    session_values = row[1 + n_user : 1 + n_user + n_session]
    copy_values = row[1 + n_user + n_session : 1 + n_user + n_session + n_message]
    user = _from_row(EndUser, user_values, conn) if user_values[0] is not None else None
    session = _from_row(ChatSession, session_values, conn) if session_values[0] is not None else None
    if session is not None and user is not None:
        session.user = user  # as select_related("user") set it
    duplicate = _from_row(Message, copy_values, conn) if copy_values[0] is not None else None
    return Snapshot(row[0], user, session, duplicate)


def _snapshot_params(*, agent_id: int, external_id: str, client_id: str, now: datetime) -> dict[str, Any]:
    return {
        "external_id": external_id,
        "active": ChatSession.Status.ACTIVE.value,
        "now": now,
        "client_id": client_id,
        "agent_id": agent_id,
    }


_snapshot_sql: dict[str, str] = {}  # per database alias: built once per process


def message_snapshot(*, agent_id: int, external_id: str, client_id: str, now: datetime) -> Snapshot | None:
    """The agent's version, its end user ``external_id`` with their live session, and their message
    with ``client_id`` (a resend's first copy, whole): one statement, written once per process. None
    when the agent does not exist. A message that is not stored by ``message_store_live`` (a refused
    one, or when that statement cannot be used) starts here."""
    conn = connection
    if (sql := _snapshot_sql.get(conn.alias)) is None:
        sql = _snapshot_sql[conn.alias] = _snapshot_select(conn)
    with conn.cursor() as cursor:
        cursor.execute(
            sql, _snapshot_params(agent_id=agent_id, external_id=external_id, client_id=client_id, now=now)
        )
        row = cursor.fetchone()
    return None if row is None else _snapshot_of(row, conn)


# --- a message in a live session: one statement ----------------------------------------------------


class Stored(NamedTuple):
    """What ``message_store_live`` found and did."""

    snapshot: Snapshot | None  # None: the agent does not exist (nothing was stored)
    message: Message | None  # the stored message, or None when it was not stored


def store_usable() -> bool:
    """Whether ``message_store_live`` may write here: PostgreSQL (data-modifying ``WITH``), and models
    whose writes need no ORM ``save()`` (``agentflow.prepared.plain_model``)."""
    return connection.vendor == "postgresql" and all(
        prepared.plain_model(m) for m in (Message, EndUser, ChatSession)
    )


def _cast(field: Any, conn: Any) -> str:
    """The parameter's type in the ``INSERT ... SELECT`` (its select list has no column to infer one
    from): the column's type without a length, so that a value too long still fails on assignment,
    as with ``INSERT ... VALUES``, instead of being cut by the cast."""
    return re.sub(r"\(.*\)$", "", field.db_type(conn)).strip()


_STORED_BY: dict[str, str] = {"user": "u_id", "session": "s_id"}  # the message's keys: the snapshot's
_store_sql: dict[str, tuple[str, list[Any]]] = {}  # per database alias: the SQL, the parameter fields
# Per database alias and the fields a caller sets: the parameters computed per message (their
# names and fields), and those that are the same every time (the other fields' defaults).
_store_params: dict[tuple[str, frozenset[str]], tuple[list[tuple[str, Any]], dict[str, Any]]] = {}


def _per_message(field: Any, given: frozenset[str]) -> bool:
    """Whether ``field``'s value may differ from one message to the next: set by the caller, the
    key, a time set on save, or a default computed by a function other than an empty ``dict`` or
    ``list``."""
    default = field.default
    return (
        field.name in given
        or field.attname in given
        or field.primary_key
        or getattr(field, "auto_now", False)
        or getattr(field, "auto_now_add", False)
        or (callable(default) and default not in (dict, list))
    )


def _store_layout(
    conn: Any, fields: list[Any], given: frozenset[str]
) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    key = (conn.alias, given)
    if (cached := _store_params.get(key)) is not None:
        return cached
    varying = [(f"f{i}", f) for i, f in enumerate(fields) if _per_message(f, given)]
    fixed_fields = [(f"f{i}", f) for i, f in enumerate(fields) if not _per_message(f, given)]
    fixed_values = prepared.insert_params(Message(), [f for _, f in fixed_fields], conn)
    if fixed_values is None:
        raise TypeError("a message field's default is an expression")
    fixed = {name: value for (name, _), value in zip(fixed_fields, fixed_values, strict=True)}
    cached = _store_params[key] = (varying, fixed)
    return cached


def _store_statement(conn: Any) -> tuple[str, list[Any]]:
    """The statement and the message fields it takes as parameters (``f<index>``).

    Kept under psycopg's 4,096 bytes, the longest query whose parsing it caches (the snapshot's
    columns are named ``c<position>``, the parameters ``f<index>``): a longer one is parsed again on
    every message.

    ``snap`` is the snapshot; ``ins`` inserts the message when the agent's version is the one the
    limits were read for (or none was given), a live session exists and no earlier copy does (``ON
    CONFLICT DO NOTHING``: a copy that another process is inserting right now is not an error);
    ``seen`` writes the user's ``last_seen_at`` and ``ext`` slides the session's expiry, each only
    after the insert and only when due (``services.LAST_SEEN_EVERY``, ``services.session_extend``).

    Lock order: ``seen`` runs after ``ins`` (it reads it) and ``ext`` after ``seen`` (it reads it,
    and ``seen`` is due whenever ``ext`` is), so the statement locks the user's row before the
    session's, as a message opening a session does (``services.message_receive``); the two never wait
    on each other in opposite orders.
    """
    if (cached := _store_sql.get(conn.alias)) is not None:
        return cached
    qn = conn.ops.quote_name
    m = Message._meta
    c, count = _snapshot_names()
    columns = ", ".join(f"c{i}" for i in range(count))
    fields = list(m.local_concrete_fields)
    exprs: list[str] = []
    params: list[Any] = []
    for f in fields:
        if f.name in _STORED_BY:
            exprs.append(f"snap.{c[_STORED_BY[f.name]]}")
        else:
            exprs.append(f"%(f{len(params)})s::{_cast(f, conn)}")
            params.append(f)
    due = (  # services.session_extend's rule: ``now + ttl - expires_at >= min(every, ttl / 10)``
        "{expires} <= %(now)s + {ttl} * interval '1 second'"
        " - LEAST(%(extend_every)s::interval, {ttl} * interval '100 milliseconds')"
    )
    snap_due = due.format(expires=f"snap.{c['s_expires_at']}", ttl=f"snap.{c['s_ttl_seconds']}")
    row_due = due.format(expires=f"s.{qn('expires_at')}", ttl=f"s.{qn('ttl_seconds')}")
    sql = (
        f"WITH snap({columns}) AS ({_snapshot_select(conn)}),"
        f" ins AS (INSERT INTO {qn(m.db_table)} ({', '.join(qn(f.column) for f in fields)})"
        f" SELECT {', '.join(exprs)} FROM snap"
        f" WHERE snap.{c['a_version']} = COALESCE(%(version)s::integer, snap.{c['a_version']})"
        f" AND snap.{c['s_id']} IS NOT NULL AND snap.{c['d_id']} IS NULL"
        f" ON CONFLICT DO NOTHING RETURNING 1),"
        f" seen AS (UPDATE {qn(EndUser._meta.db_table)} u SET {qn('last_seen_at')} = %(now)s FROM snap"
        f" WHERE u.{qn('id')} = snap.{c['u_id']} AND EXISTS (SELECT FROM ins)"
        f" AND (u.{qn('last_seen_at')} IS NULL OR u.{qn('last_seen_at')} < %(seen_before)s OR {snap_due})"
        f" RETURNING 1),"
        f" ext AS (UPDATE {qn(ChatSession._meta.db_table)} s"
        f" SET {qn('last_activity_at')} = %(now)s,"
        f" {qn('expires_at')} = %(now)s + s.{qn('ttl_seconds')} * interval '1 second'"
        f" FROM snap WHERE s.{qn('id')} = snap.{c['s_id']} AND EXISTS (SELECT FROM seen) AND {row_due}"
        f" RETURNING 1)"
        f" SELECT snap.*, EXISTS (SELECT FROM ins), EXISTS (SELECT FROM seen), EXISTS (SELECT FROM ext)"
        f" FROM snap"
    )
    cached = _store_sql[conn.alias] = (sql, params)
    return cached


def message_store_live(
    *,
    agent_id: int,
    external_id: str,
    client_id: str,
    agent_version: int | None,
    now: datetime,
    values: dict[str, Any],
    seen_every: timedelta,
    extend_every: timedelta,
) -> Stored:
    """Store ``Message(**values)`` (without user and session) in the user's live session, in one
    statement that also reads the snapshot (``message_snapshot``'s): one round trip, one transaction
    (autocommit, or the caller's).

    Stored only when the agent's stored version is ``agent_version`` (None: any), the user has a live
    session and no message with ``client_id``; otherwise nothing is written and the snapshot says
    why. Stored with it, when due: the user's ``last_seen_at`` (older than ``seen_every``) and the
    session's expiry (``services.session_extend``, ``extend_every``); the instances are updated.
    A message with ``client_id`` being stored by another process at the same moment: nothing is
    stored here, and the snapshot does not show it (read it again).
    """
    conn = connection
    sql, fields = _store_statement(conn)
    varying, fixed = _store_layout(conn, fields, frozenset(values))
    message = Message(**values)
    computed = prepared.insert_params(message, [f for _, f in varying], conn)
    if computed is None:
        raise TypeError("message_store_live stores plain values, not expressions")
    params = _snapshot_params(agent_id=agent_id, external_id=external_id, client_id=client_id, now=now)
    params.update(fixed)
    params.update((name, v) for (name, _), v in zip(varying, computed, strict=True))
    params.update(version=agent_version, seen_before=now - seen_every, extend_every=extend_every)
    with conn.cursor() as cursor:
        cursor.execute(sql, params)
        row = cursor.fetchone()
    if row is None:
        return Stored(None, None)
    snap = _snapshot_of(row, conn)
    inserted, seen, extended = row[-3:]
    if not inserted:
        return Stored(snap, None)
    user, session = snap.user, snap.session
    if user is None or session is None:  # the statement inserts only with both
        raise RuntimeError("a message was stored without a user or a live session")
    message.user, message.session = user, session
    message._state.adding, message._state.db = False, conn.alias
    if seen:
        user.last_seen_at = now
    if extended:
        session.last_activity_at = now
        session.expires_at = now + timedelta(seconds=session.ttl_seconds)
    return Stored(snap, message)
