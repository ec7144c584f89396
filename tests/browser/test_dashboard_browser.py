"""The analytics dashboard in a real browser: a staff member logs in, opens it, and every chart is drawn
with the figures of the seeded conversations (read back from the Chart.js instances in the page).

With ``AGENTFLOW_SCREENSHOT_DIR`` set, the second test saves ``dashboard.png`` (1280 x 800) there; the
README's screenshot comes from ``AGENTFLOW_SCREENSHOT_DIR=docs/images``.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from asgiref.sync import sync_to_async
from django.db import connection
from playwright.async_api import Page, expect

from tests.conversations.analytics_seed import END, EXPECTED_SUPPORT, START, seed

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

ROOT = Path(__file__).resolve().parents[2]
CHARTS = [
    "chart-activity",
    "chart-intents",
    "chart-outcomes",
    "chart-reasons",
    "chart-latency",
    "chart-tokens",
    "chart-failures",
]
# What each chart holds: its labels and each dataset's label and data, as Chart.js has them.
CHART_DATA = """() => Object.fromEntries(Object.entries(window.agentflowDashboard.charts).map(([id, chart]) => [
  id, {
    labels: chart.data.labels,
    datasets: chart.data.datasets.map((d) => ({label: d.label, data: d.data})),
    drawn: chart.getDatasetMeta(0).data.length,
    width: chart.width,
    height: chart.height,
  },
]))"""


async def _login(page: Page, base: str, next_url: str) -> None:
    await page.goto(f"{base}/admin/login/?next={next_url}")
    await page.fill("#id_username", "ops")
    await page.fill("#id_password", "ops-password-123")
    await page.click("input[type=submit]")


def _watch(page: Page) -> list[str]:
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
    page.on("response", lambda r: errors.append(f"{r.status} {r.url}") if r.status >= 400 else None)
    return errors


async def test_staff_see_every_chart_drawn_with_the_seeded_figures(
    live_asgi_url: str, chromium: Any, staff: Any
) -> None:
    await sync_to_async(seed)()
    context = await chromium.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    errors = _watch(page)

    await _login(page, live_asgi_url, "/admin/")
    await page.click("#agentflow-dashboards a")  # the admin index links the dashboard
    await expect(page).to_have_url(f"{live_asgi_url}/admin/analytics/")
    await expect(page.locator("#analytics")).to_have_attribute("data-loaded", "1")  # the last 14 days
    await page.select_option("#analytics-agent", "support")
    await page.fill("#analytics-start", START)
    await page.fill("#analytics-end", END)
    async with page.expect_response(
        lambda r: f"/admin/analytics/data?agent=support&start={START}" in r.url
    ) as fetched:
        await page.click("#analytics-form button[type=submit]")
    response = await fetched.value
    assert response.status == 200
    await expect(page.locator("#analytics")).to_have_attribute("data-loaded", "2")

    assert errors == []
    body = await response.json()
    for key, expected in EXPECTED_SUPPORT.items():
        assert body[key] == expected, key
    for chart in CHARTS:
        assert await page.locator(f"canvas#{chart}").is_visible()
    charts = await page.evaluate(CHART_DATA)
    assert sorted(charts) == sorted(CHARTS)
    for chart_id, chart in charts.items():
        assert chart["drawn"] > 0 and chart["width"] > 0 and chart["height"] > 0, chart_id

    activity = EXPECTED_SUPPORT["activity"]
    assert charts["chart-activity"] == {
        **charts["chart-activity"],
        "labels": activity["days"],
        "datasets": [
            {"label": "messages", "data": activity["messages"]},
            {"label": "conversations", "data": activity["conversations"]},
        ],
    }
    assert charts["chart-intents"]["labels"] == ["BILLING", "(none)", "OUTAGE"]
    assert charts["chart-intents"]["datasets"][0]["data"] == [2, 1, 1]
    assert charts["chart-outcomes"]["datasets"][0]["data"] == [3, 1, 2]
    assert charts["chart-reasons"]["labels"] == ["ESCALATION intent", "low confidence"]
    assert charts["chart-reasons"]["datasets"][0]["data"] == [1, 1]
    assert charts["chart-latency"]["datasets"] == [
        {"label": "p50", "data": [800, 1200, None]},
        {"label": "p95", "data": [800, 1200, None]},
    ]
    assert charts["chart-tokens"]["datasets"] == [
        {"label": "input tokens", "data": [1000, 2000, 0]},
        {"label": "output tokens", "data": [200, 400, 0]},
        {"label": "cost (USD)", "data": [0.006, 0.004, 0]},
    ]
    assert charts["chart-failures"]["datasets"] == [
        {"label": "offline turns", "data": [1, 0, 0]},
        {"label": "failed turns", "data": [0, 1, 0]},
    ]
    tiles = page.locator("#analytics-tiles")
    await expect(tiles.locator('[data-figure="resolution_rate"]')).to_have_text("33.3 %")
    await expect(tiles.locator('[data-figure="escalation_rate"]')).to_have_text("66.7 %")
    await expect(tiles.locator('[data-figure="human_p50"]')).to_have_text("5.0 min")
    await expect(tiles.locator('[data-figure="llm_p95"]')).to_have_text("1180 ms")
    await expect(tiles.locator('[data-figure="cost"]')).to_have_text("$0.0100")
    rows = page.locator("#analytics-topics tbody tr")
    await expect(rows).to_have_count(1)
    await expect(rows.first).to_have_text("Refund pleaseBILLING21")
    assert page.url.endswith(f"/admin/analytics/?agent=support&start={START}&end={END}")

    # A bad range: the endpoint's 400 message is shown, the charts stay as they were.
    await page.fill("#analytics-start", "2026-03-05")
    await page.click("#analytics-form button[type=submit]")
    await expect(page.locator("#analytics-error")).to_have_text(
        "end (2026-03-03) is before start (2026-03-05)"
    )
    assert sorted(errors) == [
        f"400 {live_asgi_url}/admin/analytics/data?agent=support&start=2026-03-05&end={END}",
        "Failed to load resource: the server responded with a status of 400 (Bad Request)",
    ]
    await context.close()


def _seed_weeks() -> None:
    """A busier two weeks for the screenshot: the benchmark's seed, scaled down to 20,000 messages."""
    spec = importlib.util.spec_from_file_location("analytics_bench", ROOT / "bench" / "analytics_bench.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    params = {"first": f"'{bench.FIRST_DAY.isoformat()}'", "threads": 4000, "days": bench.DAYS}
    with connection.cursor() as cursor:
        for statement in bench.SEED_SQL:
            for key, value in params.items():
                statement = statement.replace("{" + key + "}", str(value))
            cursor.execute(statement)
        cursor.execute("DROP TABLE bench_users, bench_sessions")


async def test_the_dashboard_draws_two_busy_weeks(
    live_asgi_url: str, chromium: Any, staff: Any, tmp_path: Path
) -> None:
    await sync_to_async(_seed_weeks)()
    context = await chromium.new_context(viewport={"width": 1280, "height": 800})
    page = await context.new_page()
    errors = _watch(page)

    await _login(
        page, live_asgi_url, quote("/admin/analytics/?agent=support&start=2026-01-01&end=2026-01-14")
    )
    await expect(page.locator("#analytics")).to_have_attribute("data-loaded", "1")

    charts = await page.evaluate(CHART_DATA)
    assert len(charts["chart-activity"]["labels"]) == 14
    assert all(count > 0 for count in charts["chart-activity"]["datasets"][0]["data"]), charts[
        "chart-activity"
    ]
    assert await page.locator("#analytics-topics tbody tr").count() == 10
    # Nothing wider than the screen at 1280 px.
    assert await page.evaluate("document.documentElement.scrollWidth") <= 1280
    assert errors == []
    folder = Path(os.environ.get("AGENTFLOW_SCREENSHOT_DIR") or tmp_path)
    await page.screenshot(path=str(folder / "dashboard.png"))
    await context.close()
