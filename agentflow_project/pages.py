"""The deployment's own pages: ``/`` (where to go from here) and ``/favicon.ico``."""

from __future__ import annotations

from functools import cache
from pathlib import Path

from django.conf import settings
from django.http import HttpRequest, HttpResponse
from django.shortcuts import render
from django.views.decorators.cache import cache_control
from django.views.decorators.http import require_GET

FAVICON = Path(__file__).resolve().parent / "static" / "favicon.ico"


@require_GET
def landing(request: HttpRequest) -> HttpResponse:
    """A small page linking the ops console, the API docs, the demo widget (when on) and health."""
    return render(
        request,
        "agentflow_project/landing.html",
        {"demo_page": settings.AGENTFLOW["DEMO_PAGE"], "offline": not settings.ANTHROPIC_API_KEY},
    )


@cache
def _favicon() -> bytes:
    return FAVICON.read_bytes()


@require_GET
@cache_control(max_age=86400, public=True)
def favicon(request: HttpRequest) -> HttpResponse:
    """The icon browsers ask every page for (served here, so none of them logs a 404)."""
    return HttpResponse(_favicon(), content_type="image/x-icon")
