"""The ops console in each staff member's own time zone.

The console's pages (``admin/base_site.html``) run ``agentflow/timezone.js``, which puts the browser's
IANA zone into the ``agentflow_tz`` cookie. This middleware activates that zone for the request, so
every timestamp Django renders (lists, change pages, the inbox, the live view, the dashboard's days)
is in it. A cookie that names no known zone is ignored: the site's ``TIME_ZONE`` applies.
"""

from __future__ import annotations

import functools
import re
import zoneinfo
from collections.abc import Callable

from django.http import HttpRequest, HttpResponse
from django.utils import timezone

COOKIE = "agentflow_tz"
_NAME = re.compile(r"[A-Za-z0-9_+\-/]{1,64}")


@functools.lru_cache(maxsize=256)
def zone_named(name: str) -> zoneinfo.ZoneInfo | None:
    """The zone called ``name`` (an IANA name such as ``Europe/Berlin``), or None when there is none."""
    if not _NAME.fullmatch(name) or ".." in name:
        return None
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, OSError):
        return None


class StaffTimezoneMiddleware:
    """Activate the zone of the ``agentflow_tz`` cookie for the request (the site's zone otherwise)."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        zone = zone_named(request.COOKIES.get(COOKIE, ""))
        if zone is None:
            timezone.deactivate()
        else:
            timezone.activate(zone)
        try:
            return self.get_response(request)
        finally:
            timezone.deactivate()
