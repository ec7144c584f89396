"""The console in each staff member's own time zone: the agentflow_tz cookie its pages set is
activated per request; a cookie naming no zone is ignored."""

from __future__ import annotations

from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from django.test import Client

from conversations.models import EndUser
from conversations.timezones import zone_named

from .factories import EndUserFactory

pytestmark = pytest.mark.django_db

SEEN = datetime(2026, 1, 15, 12, 30, tzinfo=ZoneInfo("UTC"))


@pytest.fixture
def staff(django_user_model: Any) -> Any:
    return django_user_model.objects.create_superuser("ops", "ops@example.com", "ops-password-123")


def _page(staff: Any, cookie: str | None, path: str) -> str:
    client = Client()
    client.force_login(staff)
    if cookie is not None:
        client.cookies["agentflow_tz"] = cookie
    response = client.get(path)
    assert response.status_code == 200
    return response.content.decode()


def _end_user() -> EndUser:
    user = EndUserFactory(external_id="tz-user")
    EndUser.objects.filter(pk=user.pk).update(created_at=SEEN, last_seen_at=SEEN)
    return user


def test_lists_show_times_in_the_zone_of_the_cookie(staff: Any) -> None:
    _end_user()

    new_york = _page(staff, "America/New_York", "/admin/conversations/enduser/")
    kolkata = _page(staff, "Asia/Kolkata", "/admin/conversations/enduser/")
    default = _page(staff, None, "/admin/conversations/enduser/")

    assert ("2026-01-15 07:30" in new_york, "2026-01-15 12:30" in new_york) == (True, False)
    assert ("2026-01-15 18:00" in kolkata, "2026-01-15 12:30" in kolkata) == (True, False)
    assert "2026-01-15 12:30" in default  # the site's TIME_ZONE (UTC in the tests)


@pytest.mark.parametrize(
    "cookie", ["Not/AZone", "../../etc/passwd", "x" * 100, "Europe/Berlin; path=/", "", "UTC\x00"]
)
def test_a_cookie_that_names_no_zone_is_ignored(staff: Any, cookie: str) -> None:
    _end_user()

    page = _page(staff, cookie, "/admin/conversations/enduser/")

    assert "2026-01-15 12:30" in page


def test_the_live_page_tells_its_script_the_staff_members_zone(staff: Any) -> None:
    user = _end_user()
    client = Client()
    client.force_login(staff)
    client.cookies["agentflow_tz"] = "Europe/Berlin"

    response = client.get(f"/admin/conversations/enduser/{user.pk}/live/")

    assert response.context["live_config"]["timeZone"] == "Europe/Berlin"


def test_every_console_page_carries_the_zone_script(staff: Any) -> None:
    for path in ("/admin/", "/admin/conversations/enduser/", "/admin/conversations/escalation/inbox/"):
        page = _page(staff, "Europe/Berlin", path)
        assert '<script src="/static/agentflow/timezone.js" data-current="Europe/Berlin"></script>' in page, (
            path
        )


def test_zone_names() -> None:
    assert (zone_named("Europe/Berlin"), zone_named("Mars/Olympus"), zone_named("../UTC")) == (
        ZoneInfo("Europe/Berlin"),
        None,
        None,
    )
