"""Schemas the REST routers of several apps share: the one error shape of every failure."""

from __future__ import annotations

from typing import Any

from ninja import Schema


class ErrorDetail(Schema):
    code: str
    message: str
    field: str | None = None


class ErrorOut(Schema):
    error: ErrorDetail


def responses(ok: dict[int, Any], *extra: int) -> dict[int, Any]:
    """A route's responses: its own, the common errors (400, 401, 404, 422, and 503 ``unavailable``
    when PostgreSQL or Redis is down) and ``extra`` codes.

    The user id, id and filter parameters are described in the schema by agentflow.web.api.
    """
    unavailable = ok[503] | ErrorOut if 503 in ok else ErrorOut
    return {**ok, **{code: ErrorOut for code in (400, 401, 404, 422, *extra)}, 503: unavailable}
