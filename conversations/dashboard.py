"""The analytics dashboard of the ops console: a page in the admin and the JSON its charts are drawn from.

Both sit behind the admin's login (``admin.site.admin_view``: active staff only; others are sent to
the login page) and need the ``conversations.view_message`` permission (403 otherwise). The figures
come from ``conversations.analytics``; this module only parses the query and serializes.

``GET /admin/analytics/data?agent=<name>&start=YYYY-MM-DD&end=YYYY-MM-DD``: ``agent`` empty or absent
means every agent; ``end`` defaults to today, ``start`` to ``DEFAULT_DAYS`` - 1 days before ``end``. A
bad date, ``end`` before ``start``, a range over ``MAX_DAYS`` days, an unknown agent or an unknown
parameter answer 400 with ``{"error": {"code", "message", "field"}}``.
"""

from __future__ import annotations

from datetime import date, timedelta

from django.contrib import admin
from django.core.exceptions import PermissionDenied
from django.http import HttpRequest, HttpResponse, JsonResponse, QueryDict
from django.template.response import TemplateResponse
from django.urls import URLPattern, path
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from agentflow.conf import conf

from .analytics import Scope, analytics_report
from .models import Agent

DEFAULT_DAYS = 14
MAX_DAYS = 366
PARAMS = frozenset({"agent", "start", "end"})
PERMISSION = "conversations.view_message"


class BadQuery(ValueError):
    """A query parameter the dashboard cannot use; ``field`` names it."""

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


def _date(value: str, field: str) -> date:
    try:
        return date.fromisoformat(value)
    except ValueError:
        raise BadQuery(f"{field} must be a date as YYYY-MM-DD; got {value[:40]!r}", field=field) from None


def scope_from_query(query: QueryDict) -> Scope:
    """The dashboard's scope from a request's query parameters.

    Raises:
        BadQuery: an unknown parameter, a bad or reversed date, a range over ``MAX_DAYS``, an unknown agent.
    """
    unknown = sorted(set(query) - PARAMS)
    if unknown:
        raise BadQuery(f"unknown parameter {unknown[0]!r} (use agent, start, end)", field=unknown[0])
    for name in PARAMS:
        if len(query.getlist(name)) > 1:
            raise BadQuery(f"{name} is given more than once", field=name)
    end_text, start_text = str(query.get("end") or ""), str(query.get("start") or "")
    end = _date(end_text, "end") if end_text else timezone.localdate()
    start = _date(start_text, "start") if start_text else end - timedelta(days=DEFAULT_DAYS - 1)
    if end < start:
        raise BadQuery(f"end ({end}) is before start ({start})", field="end")
    if (end - start).days + 1 > MAX_DAYS:
        raise BadQuery(
            f"the range is {(end - start).days + 1} days; at most {MAX_DAYS} are allowed", field="end"
        )
    agent = None
    name = str(query.get("agent") or "")
    if name:
        agent = Agent.objects.filter(name=name).first()
        if agent is None:
            raise BadQuery(f"unknown agent {name[:100]!r}", field="agent")
    return Scope(agent=agent, start=start, end=end)


def _require_permission(request: HttpRequest) -> None:
    if not request.user.has_perm(PERMISSION):
        raise PermissionDenied("the dashboard needs the permission to view messages")


@never_cache
@require_GET
def dashboard_data(request: HttpRequest) -> JsonResponse:
    """Every figure of the dashboard as JSON (see ``conversations.analytics.analytics_report``)."""
    if not request.user.has_perm(PERMISSION):
        return JsonResponse(
            {
                "error": {
                    "code": "forbidden",
                    "message": "the dashboard needs the permission to view messages",
                }
            },
            status=403,
        )
    try:
        scope = scope_from_query(request.GET)
    except BadQuery as exc:
        return JsonResponse(
            {"error": {"code": "invalid", "message": str(exc), "field": exc.field}}, status=400
        )
    return JsonResponse(analytics_report(scope))


@never_cache
@require_GET
def dashboard_page(request: HttpRequest) -> HttpResponse:
    """The dashboard: a form (agent, dates) and the charts, drawn in the page from ``dashboard_data``."""
    _require_permission(request)
    try:
        scope = scope_from_query(request.GET)
        error = ""
    except BadQuery as exc:
        scope, error = scope_from_query(QueryDict()), str(exc)
    context = {
        **admin.site.each_context(request),
        "title": "Analytics",
        "agents": list(Agent.objects.order_by("name").values_list("name", flat=True)),
        "scope": scope,
        "agent_name": scope.agent.name if scope.agent is not None else "",
        "error": error,
        "max_days": MAX_DAYS,
        "time_zone": timezone.get_current_timezone_name(),
        "prices": conf().MODEL_PRICES,
    }
    return TemplateResponse(
        request, "admin/conversations/analytics.html", context, status=400 if error else 200
    )


def urls() -> list[URLPattern]:
    """The dashboard's routes, behind the admin's login; include them under ``admin/analytics/``."""
    return [
        path("", admin.site.admin_view(dashboard_page), name="agentflow-analytics"),
        path("data", admin.site.admin_view(dashboard_data), name="agentflow-analytics-data"),
    ]
