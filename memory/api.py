"""REST routes for a user's data as a whole: export it as JSON, or erase it.

Thin: find the user, call one service, return its result.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import Router, Schema

from agentflow.validation import clean_user_id
from conversations.api import ErrorOut
from conversations.audit import request_actor
from conversations.selectors import user_get

from .privacy import user_erase, user_export

router = Router(tags=["privacy"])


class ErasedOut(Schema):
    erased: dict[str, int]


@router.get(
    "/users/{user_id}/export",
    response={200: dict[str, Any], 400: ErrorOut, 404: ErrorOut},
    summary="Export everything stored about a user (JSON)",
)
def export_user(request: HttpRequest, user_id: str) -> dict[str, Any]:
    return user_export(user=user_get(external_id=clean_user_id(user_id)), **request_actor(request))


@router.delete(
    "/users/{user_id}",
    response={200: ErasedOut, 400: ErrorOut, 404: ErrorOut},
    summary="Erase a user with their sessions, threads, messages, escalations and memories",
)
def erase_user(request: HttpRequest, user_id: str) -> dict[str, Any]:
    user = user_get(external_id=clean_user_id(user_id))
    return {"erased": user_erase(user=user, **request_actor(request))}
