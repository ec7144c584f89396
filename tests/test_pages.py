"""The deployment's own pages: the landing page at ``/`` and ``/favicon.ico``."""

from __future__ import annotations

from typing import Any

import pytest

pytestmark = pytest.mark.django_db


def test_landing_page_links_console_docs_demo_and_health(client: Any) -> None:
    response = client.get("/")

    assert response.status_code == 200
    html = response.content.decode()
    for href in ("/admin/", "/admin/analytics/", "/api/docs", "/demo/", "/api/health"):
        assert f'href="{href}"' in html
    assert "Offline mode" in html  # the test settings have no ANTHROPIC_API_KEY


def test_landing_page_leaves_out_the_demo_when_it_is_off(client: Any, settings: Any) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "DEMO_PAGE": False}

    assert 'href="/demo/"' not in client.get("/").content.decode()


def test_favicon_is_an_icon(client: Any) -> None:
    response = client.get("/favicon.ico")

    assert response.status_code == 200
    assert response["Content-Type"] == "image/x-icon"
    assert response.content[:4] == b"\x00\x00\x01\x00"  # the ICO header
    assert "max-age=86400" in response["Cache-Control"]


def test_view_site_in_the_admin_leads_to_the_landing_page(client: Any, django_user_model: Any) -> None:
    client.force_login(django_user_model.objects.create_superuser("ops", "ops@example.com", "ops-pw-123456"))

    html = client.get("/admin/").content.decode()

    assert '<a href="/">View site</a>' in html
    assert client.get("/").status_code == 200


def test_landing_page_takes_only_get(client: Any) -> None:
    assert client.post("/").status_code == 405
