"""The audit trail: one append-only log of who did what (``AuditEvent``), written by ``audit_record``.

What is recorded (docs/operations.md, "Audit trail"):

- staff actions: claim, release, hand back, reply, resolve, reopen, merge, split, approve and
  withdraw global memories, intent category edits, API key creation and changes;
- API-key calls: every authenticated REST call (key, route, end user), refused keys (by IP), and
  the user export and erase they ask for;
- staff logins, failed logins and logouts (Django's auth signals).

Where a request or a WebSocket connection is behind the action, its client IP and route come from
``audit_scope`` (set by ``AuditContextMiddleware`` for HTTP and by the staff consumer), so services
record who did it without knowing the transport.

Erasing an end user keeps the rows about them but strips their personal data
(``audit_forget_subject``): the external id, the free-text detail and the ids of their (now deleted)
rows. Only the erase event keeps a keyed hash of the id (HMAC-SHA256 with the secret key), so a
later "was user X erased?" can be answered by someone who knows X, but the ids cannot be listed.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import ipaddress
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.db import models

from agentflow import prepared

from .models import ApiKey, AuditEvent, AuditQuerySet, EndUser, StaffUser

if TYPE_CHECKING:
    from django.contrib.auth.models import AbstractBaseUser
    from django.http import HttpRequest, HttpResponse

Action = AuditEvent.Action
Actor = AuditEvent.Actor

# {"ip": ..., "route": ...} of the request or connection being served, if any.
_scope: ContextVar[dict[str, Any] | None] = ContextVar("agentflow_audit_scope", default=None)


@contextlib.contextmanager
def audit_scope(*, ip: str | None, route: str) -> Iterator[None]:
    """Within this block, audit rows carry this client IP and route (unless given explicitly)."""
    token = _scope.set({"ip": ip or None, "route": route[:255]})
    try:
        yield
    finally:
        _scope.reset(token)


def client_ip(request: HttpRequest) -> str | None:
    """The client's IP as Django sees it (``REMOTE_ADDR``; a proxy in front must set it right).

    None when it is not an IP address (a unix socket, an ASGI test client's "testclient").
    """
    value = request.META.get("REMOTE_ADDR") or ""
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        return None


def request_actor(request: HttpRequest) -> dict[str, Any]:
    """``audit_record``'s actor arguments for a REST request: its API key, or the staff session."""
    auth = getattr(request, "auth", None)
    if isinstance(auth, ApiKey):
        return {"api_key": auth}
    if auth is not None and getattr(auth, "is_staff", False):
        return {"staff_user": auth}
    return {}


def subject_hash(external_id: str) -> str:
    """A keyed hash of an end user's id: stable for one secret key, not reversible or listable."""
    return hmac.new(settings.SECRET_KEY.encode(), external_id.encode(), hashlib.sha256).hexdigest()


def audit_record(
    *,
    action: str,
    staff_user: StaffUser | None = None,
    api_key: ApiKey | None = None,
    actor_kind: str | None = None,
    target: models.Model | None = None,
    target_type: str = "",
    target_id: object = "",
    subject: str = "",
    end_user_pk: int | None = None,
    subject_hash: str = "",
    detail: dict[str, Any] | None = None,
    ip: str | None = None,
    route: str | None = None,
) -> AuditEvent:
    """Append one audit row. The actor is the staff account, else the API key, else the system.

    Args:
        action: an ``AuditEvent.Action``.
        staff_user: the staff account that acted (its username is copied, so the row outlives it).
        api_key: the API key that acted (its name and prefix are copied).
        actor_kind: overrides the actor derived from the above (``end_user``, ``anonymous``).
        target: the object acted on (its model name and pk), or ``target_type`` / ``target_id``.
        subject: the external id of the end user concerned (what export and erase look up).
        end_user_pk: instead of ``subject``, the end user's pk (their external id is looked up).
        subject_hash: for the erase event, the keyed hash of the erased id (``subject_hash()``).
        detail: small JSON facts (never message text).
        ip: the client IP; by default the current ``audit_scope``'s.
        route: the route or page; by default the current ``audit_scope``'s.
    """
    scope = _scope.get() or {}
    if not subject and end_user_pk is not None:
        subject = EndUser.objects.filter(pk=end_user_pk).values_list("external_id", flat=True).first() or ""
    if actor_kind is None:
        actor_kind = Actor.STAFF if staff_user is not None else Actor.API_KEY if api_key else Actor.SYSTEM
    if target is not None:
        target_type, target_id = target._meta.model_name or "", target.pk
    # Every API call writes one: the INSERT is compiled once per process (agentflow.prepared).
    return prepared.create(
        AuditEvent,
        actor_kind=actor_kind,
        staff_user=staff_user if staff_user is not None and staff_user.pk else None,
        staff_username=staff_user.get_username()[:150] if staff_user is not None else "",
        api_key=api_key,
        api_key_label=f"{api_key.name} ({api_key.prefix})"[:120] if api_key is not None else "",
        action=action,
        target_type=target_type[:32],
        target_id=str(target_id)[:64],
        subject=subject[:255],
        subject_hash=subject_hash,
        detail=detail or {},
        ip=ip if ip is not None else scope.get("ip"),
        route=(route if route is not None else scope.get("route", ""))[:255],
    )


def audit_events_for_subject(*, external_id: str) -> models.QuerySet[AuditEvent]:
    """The audit rows about one end user, oldest first (their export includes them)."""
    return AuditEvent.objects.filter(subject=external_id).order_by("created_at", "id")


def audit_forget_subject(*, external_id: str) -> int:
    """Strip an erased end user's personal data from the audit rows about them; the rows stay.

    Their external id, the rows' free-text detail and the target ids (of rows that are deleted with
    the user) go. This is the one change audit rows ever get.

    Returns:
        How many rows were scrubbed.
    """
    rows = cast(AuditQuerySet, AuditEvent.objects.filter(subject=external_id))
    return rows._scrub(subject="", detail={}, target_id="")


def audit_export_rows(*, external_id: str) -> list[dict[str, Any]]:
    """The audit rows about one end user as the export shows them: what was done, when and by whom.

    Staff appear by username, API keys by name; IPs are the staff's or the host backend's, not the
    user's, and are left out.
    """
    return [
        {
            "created_at": event.created_at.isoformat(),
            "action": event.action,
            "actor": event.actor_kind,
            "by": event.staff_username or event.api_key_label or None,
            "target_type": event.target_type or None,
            "target_id": event.target_id or None,
        }
        for event in audit_events_for_subject(external_id=external_id)
    ]


class AuditContextMiddleware:
    """Sets ``audit_scope`` (client IP, method and path) for each HTTP request; sync and async."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[..., Any]) -> None:
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        if iscoroutinefunction(self):
            return self.__acall__(request)
        with audit_scope(ip=client_ip(request), route=f"{request.method} {request.path}"):
            return self.get_response(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        with audit_scope(ip=client_ip(request), route=f"{request.method} {request.path}"):
            return await self.get_response(request)


# --- logins (Django's auth signals; connected in ConversationsConfig.ready) ---------------------


def on_logged_in(sender: Any, request: HttpRequest | None, user: AbstractBaseUser, **kwargs: Any) -> None:
    audit_record(action=Action.LOGIN, staff_user=user, ip=client_ip(request) if request else None)


def on_logged_out(
    sender: Any, request: HttpRequest | None, user: AbstractBaseUser | None, **kwargs: Any
) -> None:
    if user is not None:
        audit_record(action=Action.LOGOUT, staff_user=user, ip=client_ip(request) if request else None)


def on_login_failed(
    sender: Any, credentials: dict[str, Any], request: HttpRequest | None = None, **kwargs: Any
) -> None:
    username = str(credentials.get("username") or "")[:150]  # Django already masks the password
    audit_record(
        action=Action.LOGIN_FAILED,
        actor_kind=Actor.ANONYMOUS,
        detail={"username": username},
        ip=client_ip(request) if request else None,
    )
