"""REST routes for a user's data as a whole: export it as JSON, or erase it.

Thin: find the user, call one service, return its result.
"""

from __future__ import annotations

from typing import Any

from django.http import HttpRequest
from ninja import Router, Schema

from agentflow.validation import clean_user_id
from conversations.audit import request_actor
from conversations.models import ApiKey
from conversations.schemas import responses

from .privacy import person_erase, person_export

router = Router(tags=["privacy"])


class ErasedOut(Schema):
    erased: dict[str, int]


@router.get(
    "/users/{user_id}/export",
    response=responses({200: dict[str, Any]}),
    summary="Export everything stored about a user (JSON)",
)
def export_user(request: HttpRequest, user_id: str) -> dict[str, Any]:
    """The person across every agent; with a key limited to one agent, with that agent only."""
    return person_export(
        external_id=clean_user_id(user_id), agent_id=_key_agent(request), **request_actor(request)
    )


@router.delete(
    "/users/{user_id}",
    response=responses({200: ErasedOut}),
    summary="Erase a user with their sessions, threads, messages, escalations and memories",
)
def erase_user(request: HttpRequest, user_id: str) -> dict[str, Any]:
    """The person across every agent; with a key limited to one agent, with that agent only."""
    erased = person_erase(
        external_id=clean_user_id(user_id), agent_id=_key_agent(request), **request_actor(request)
    )
    return {"erased": erased}


def _key_agent(request: HttpRequest) -> int | None:
    key = getattr(request, "auth", None)
    return key.agent_id if isinstance(key, ApiKey) else None
