"""The REST API object: django-ninja, OpenAPI docs at /api/docs, one error shape for every failure.

Host backends authenticate with an ``X-API-Key`` header (keys are made in the admin or with
``manage.py agentflow_demo``); logged-in staff may use the API from the browser (the docs page).

Every call with a valid key is audited (which key, which route, which end user) and counted against
the key's and the client IP's rate limits; a wrong key is audited and counted against the client
IP, which is refused outright (429) once it has guessed too often (docs/configuration.md).
"""

from __future__ import annotations

import logging
from typing import Any

from django.conf import settings
from django.core.exceptions import RequestDataTooBig
from django.http import HttpRequest, HttpResponse
from ninja import NinjaAPI, Schema
from ninja.errors import AuthenticationError, HttpError
from ninja.errors import ValidationError as NinjaValidationError
from ninja.responses import Status
from ninja.security import APIKeyHeader, SessionAuthIsStaff
from pydantic import Field as PydanticField

from agentflow import drain
from agentflow.conf import anthropic_api_key
from agentflow.errors import Forbidden, InvalidInput, NotFound, RateLimited
from agentflow.unavailable import UNAVAILABLE_ERRORS, retry_after_seconds, unavailable_message
from agentflow.validation import USER_ID_MAX, USER_ID_PATTERN
from conversations.api import router as conversations_router
from conversations.audit import audit_record, client_ip
from conversations.models import AGENT_NAME_PATTERN, ApiKey, AuditEvent
from conversations.ratelimit import api_request_take, auth_failure_count, auth_failures_check
from conversations.services import api_key_check
from memory.api import router as memory_router

from .health import health_components

logger = logging.getLogger("agentflow.api")


class ApiKeyAuth(APIKeyHeader):
    param_name = "X-API-Key"

    def authenticate(self, request: HttpRequest, key: str | None) -> Any:
        if not key:
            return None  # no key: the staff session may still authenticate the request
        ip = client_ip(request)
        auth_failures_check(ip=ip)  # raises RateLimited for an address that keeps guessing
        match = request.resolver_match
        route = (
            f"{request.method} /{match.route}" if match is not None else f"{request.method} {request.path}"
        )
        subject = str((match.kwargs if match is not None else {}).get("user_id", ""))
        api_key = api_key_check(plain=key)
        if api_key is None:
            auth_failure_count(ip=ip)
            known = ApiKey.objects.filter(prefix=key[:12]).first() if key.startswith("afk_") else None
            audit_record(
                action=AuditEvent.Action.API_AUTH_FAILED,
                actor_kind=AuditEvent.Actor.ANONYMOUS,
                api_key=known,
                route=route,
                detail={
                    "reason": "unknown key"
                    if known is None
                    else "inactive key"
                    if not known.active
                    else "wrong key"
                },
            )
            return None
        api_request_take(api_key_pk=api_key.pk, ip=ip)  # raises RateLimited
        audit_record(action=AuditEvent.Action.API_CALL, api_key=api_key, route=route, subject=subject[:255])
        return api_key


class StaffSessionAuth(SessionAuthIsStaff):
    """Logged-in staff (the docs page). Skipped without a session cookie, so that a request with a
    missing or wrong API key gets 401, not the CSRF failure of a cookie-less session check."""

    def __call__(self, request: HttpRequest) -> Any:
        if settings.SESSION_COOKIE_NAME not in request.COOKIES:
            return None
        return super().__call__(request)


USER_ID_DOC = (
    "The host application's id for the end user, percent-encoded: 1-255 characters, not only spaces,"
    " without control characters, U+FFFD or '/'. Bytes that are not UTF-8 (%FF) or an encoded '/'"
    " (%2F) are refused (400 invalid_path)."
)
# What the views check by hand (agentflow.validation, the selectors), told to clients in the schema.
PARAMETER_SCHEMAS: dict[str, dict[str, Any]] = {
    "user_id": {"minLength": 1, "maxLength": USER_ID_MAX, "pattern": USER_ID_PATTERN},
    "message_id": {"format": "uuid"},
    "thread_id": {"format": "uuid"},
    "session_id": {"format": "uuid"},
    "status": {"enum": ["open", "dormant", "resolved"]},
    "agent": {"minLength": 1, "maxLength": 100, "pattern": AGENT_NAME_PATTERN},
}


class AgentFlowAPI(NinjaAPI):
    def get_openapi_schema(self, **kwargs: Any) -> Any:
        """The generated schema, completed with the checks the views make by hand.

        Path and query parameters get the constraints of ``PARAMETER_SCHEMAS``; ``message`` gets its
        ``maxLength`` from the default agent's stored configuration (``input_config.max_message_chars``;
        other agents may set their own, and a longer message gets its 400).
        """
        from agentflow.conf import conf
        from conversations.agents import agent_settings

        schema = super().get_openapi_schema(**kwargs)
        for operations in schema["paths"].values():
            for operation in operations.values():
                for parameter in operation.get("parameters", []):
                    extra = PARAMETER_SCHEMAS.get(parameter["name"])
                    if extra is None:
                        continue
                    target = parameter["schema"]
                    # An optional query parameter is anyOf [string, null]: constrain the string.
                    for branch in target.get("anyOf", []):
                        if branch.get("type") == "string":
                            target = branch
                    target.update(extra)
                    if parameter["name"] == "user_id":
                        parameter["description"] = USER_ID_DOC
        limit = agent_settings(name=conf().DEFAULT_AGENT).max_message_chars
        schema["components"]["schemas"]["MessageIn"]["properties"]["message"]["maxLength"] = limit
        return schema


api = AgentFlowAPI(
    title="AgentFlow API",
    version="1",
    description="Conversational agents with sessions, threading, intents, hand-off and memory.",
    auth=[ApiKeyAuth(), StaffSessionAuth()],
    urls_namespace="api",
)


def _error(
    request: HttpRequest, status: int, code: str, message: str, field: str | None = None
) -> HttpResponse:
    body: dict[str, Any] = {"code": code, "message": message}
    if field:
        body["field"] = field
    return api.create_response(request, {"error": body}, status=status)


@api.exception_handler(InvalidInput)
def _invalid_input(request: HttpRequest, exc: InvalidInput) -> HttpResponse:
    return _error(request, 400, exc.code, str(exc), exc.field)


@api.exception_handler(NotFound)
def _not_found(request: HttpRequest, exc: NotFound) -> HttpResponse:
    return _error(request, 404, exc.code, str(exc))


@api.exception_handler(Forbidden)
def _forbidden(request: HttpRequest, exc: Forbidden) -> HttpResponse:
    return _error(request, 403, exc.code, str(exc))


@api.exception_handler(RateLimited)
def _rate_limited(request: HttpRequest, exc: RateLimited) -> HttpResponse:
    response = _error(request, 429, exc.code, str(exc))
    response["Retry-After"] = str(max(1, int(exc.retry_after)))
    return response


def _unavailable(request: HttpRequest, exc: Exception) -> HttpResponse:
    """PostgreSQL, Redis or the channel layer is down: a JSON 503 with Retry-After, never a 500."""
    logger.warning("%s %s: unavailable (%s: %s)", request.method, request.path, type(exc).__name__, exc)
    response = _error(request, 503, "unavailable", unavailable_message(exc))
    response["Retry-After"] = str(retry_after_seconds())
    return response


for _error_class in UNAVAILABLE_ERRORS:
    api.add_exception_handler(_error_class, _unavailable)  # type: ignore[arg-type]


@api.exception_handler(NinjaValidationError)
def _validation(request: HttpRequest, exc: NinjaValidationError) -> HttpResponse:
    first = exc.errors[0] if exc.errors else {}
    loc = [str(p) for p in first.get("loc", []) if p not in ("body", "payload", "query", "path")]
    if first.get("type") == "json_invalid" or "JSON" in str(first.get("msg", "")):
        return _error(request, 400, "bad_json", "the request body is not valid JSON")
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', []) if p not in ('body', 'payload'))}: {e.get('msg')}"
        for e in exc.errors
    )
    return _error(request, 422, "invalid_request", message or "invalid request", ".".join(loc) or None)


@api.exception_handler(RequestDataTooBig)
def _too_large(request: HttpRequest, exc: RequestDataTooBig) -> HttpResponse:
    limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
    return _error(request, 413, "too_large", f"the request body is over {limit} bytes")


@api.exception_handler(AuthenticationError)
def _unauthorized(request: HttpRequest, exc: AuthenticationError) -> HttpResponse:
    return _error(request, 401, "unauthorized", "send a valid X-API-Key header (or log in as staff)")


@api.exception_handler(HttpError)
def _http_error(request: HttpRequest, exc: HttpError) -> HttpResponse:
    code = "bad_json" if exc.status_code == 400 and "parse" in str(exc).lower() else "http_error"
    return _error(request, exc.status_code, code, str(exc))


class ComponentOut(Schema):
    ok: bool
    latency_ms: float
    error: str | None


class WorkerComponentOut(ComponentOut):
    heartbeat_age_seconds: float | None = PydanticField(description="age of the newest worker heartbeat")
    workers: int = PydanticField(description="workers with a heartbeat younger than the limit")


class ComponentsOut(Schema):
    database: ComponentOut
    redis: ComponentOut
    channel_layer: ComponentOut
    worker: WorkerComponentOut


class LiveOut(Schema):
    status: str


class ReadyOut(Schema):
    status: str = PydanticField(
        description='"ok"; "unavailable" when a component is not ok; "draining" when the process is stopping'
    )
    components: ComponentsOut


class HealthOut(Schema):
    status: str = PydanticField(description='"ok" while PostgreSQL answers, else "unavailable"')
    offline: bool
    redis: str
    ready: bool = PydanticField(description="every component is ok (as GET /api/health/ready)")
    components: ComponentsOut


def _health_status(response: HttpResponse, ok: bool) -> None:
    if not ok:
        response["Retry-After"] = str(retry_after_seconds())


@api.get(
    "/health/live",
    auth=None,
    response=LiveOut,
    tags=["operations"],
    summary="Liveness: the process answers (checks nothing else)",
)
async def health_live(request: HttpRequest) -> dict[str, Any]:
    return {"status": "ok"}


@api.get(
    "/health/ready",
    auth=None,
    response={200: ReadyOut, 503: ReadyOut},
    tags=["operations"],
    summary="Readiness: PostgreSQL, Redis, the channel layer and a live worker",
    description="200 when every component is ok; 503 with Retry-After when one is not.",
)
async def health_ready(request: HttpRequest, response: HttpResponse) -> Status[dict[str, Any]]:
    components = await health_components()
    ok = all(c["ok"] for c in components.values())
    if drain.draining():  # stopping (SIGTERM): send no more here
        _health_status(response, False)
        return Status(503, {"status": "draining", "components": components})
    _health_status(response, ok)
    return Status(200 if ok else 503, {"status": "ok" if ok else "unavailable", "components": components})


@api.get(
    "/health",
    auth=None,
    response={200: HealthOut, 503: HealthOut},
    tags=["operations"],
    summary="Health and configuration",
    description=(
        "200 while PostgreSQL answers (as before), 503 with Retry-After when it does not; `ready` and"
        " `components` report every component (see GET /api/health/ready)."
    ),
)
async def health(request: HttpRequest, response: HttpResponse) -> Status[dict[str, Any]]:
    components = await health_components()
    ok = components["database"]["ok"]
    _health_status(response, ok)
    body = {
        "status": "ok" if ok else "unavailable",
        "offline": not anthropic_api_key(),
        "redis": getattr(settings, "REDIS_SOURCE", "REDIS_URL"),
        "ready": all(c["ok"] for c in components.values()),
        "components": components,
    }
    return Status(200 if ok else 503, body)


api.add_router("/", conversations_router)
api.add_router("/", memory_router)
