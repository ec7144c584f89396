"""The analytics dashboard's figures and its JSON endpoint: exact aggregates on seeded conversations,
bad query parameters, and who may look."""

from __future__ import annotations

from typing import Any

import pytest
from django.urls import reverse

from conversations.models import Message
from tests.conversations.analytics_seed import DAYS, END, EXPECTED_SUPPORT, START, seed

pytestmark = pytest.mark.django_db

DATA = "/admin/analytics/data"


@pytest.fixture
def staff_client(client: Any, django_user_model: Any) -> Any:
    client.force_login(
        django_user_model.objects.create_superuser("ops", "ops@example.com", "ops-password-123")
    )
    return client


@pytest.fixture
def seeded() -> dict[str, Any]:
    return seed()


def _get(client: Any, **params: str) -> Any:
    return client.get(DATA, params)


def test_figures_of_one_agent(staff_client: Any, seeded: dict[str, Any]) -> None:
    response = _get(staff_client, agent="support", start=START, end=END)

    assert response.status_code == 200
    body = response.json()
    assert (body["agent"], body["start"], body["end"], body["time_zone"]) == ("support", START, END, "UTC")
    for key, expected in EXPECTED_SUPPORT.items():
        assert body[key] == expected, key


def test_every_agent_adds_the_other_agents_rows(staff_client: Any, seeded: dict[str, Any]) -> None:
    body = _get(staff_client, start=START, end=END).json()

    assert body["agent"] is None
    assert body["activity"]["conversations"] == [2, 2, 0]
    assert body["activity"]["messages"] == [5, 5, 0]
    assert body["intents"][0] == {"intent": "BILLING", "messages": 2}
    assert {"intent": "QUERY", "messages": 1} in body["intents"]
    assert body["llm_latency"]["overall"] == {"replies": 3, "p50_ms": 800.0, "p95_ms": 1160.0}
    # The shop's model has no price: its tokens count, its cost does not, and it is named.
    assert body["tokens"]["input_tokens"] == [1000, 2500, 0]
    assert body["tokens"]["total_cost_usd"] == 0.01
    assert body["tokens"]["unpriced_models"] == ["mystery-model"]
    assert body["outcomes"]["conversations"] == 4


def test_the_other_agent_alone(staff_client: Any, seeded: dict[str, Any]) -> None:
    body = _get(staff_client, agent="shop", start=START, end=END).json()

    assert body["activity"]["messages"] == [0, 2, 0]
    assert body["outcomes"] == {
        "conversations": 1,
        "resolved": 0,
        "escalated": 0,
        "resolution_rate": 0.0,
        "escalation_rate": 0.0,
    }
    assert body["first_human_response"] == {
        "escalations": 0,
        "answered": 0,
        "waiting": 0,
        "p50_seconds": None,
        "p95_seconds": None,
    }
    assert body["escalation_reasons"] == []


def test_prices_come_from_the_settings(staff_client: Any, seeded: dict[str, Any], settings: Any) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "MODEL_PRICES": {"claude-haiku-5-5": "10:20"}}

    tokens = _get(staff_client, agent="support", start=START, end=END).json()["tokens"]

    # haiku now 10 / 20: 2000*10 + 400*20 = 28000 micro-dollars; sonnet keeps its default.
    assert tokens["cost_usd"] == [0.006, 0.028, 0.0]
    assert tokens["total_cost_usd"] == 0.034


def test_a_range_with_no_rows_is_all_zero(staff_client: Any, seeded: dict[str, Any]) -> None:
    body = _get(staff_client, agent="support", start="2026-04-01", end="2026-04-01").json()

    assert body["activity"]["messages"] == [0]
    assert body["outcomes"]["resolution_rate"] is None
    assert body["llm_latency"]["overall"] == {"replies": 0, "p50_ms": None, "p95_ms": None}
    assert body["intents"] == [] and body["unresolved_topics"] == []


def test_one_day_bounds_are_inclusive(staff_client: Any, seeded: dict[str, Any]) -> None:
    body = _get(staff_client, agent="support", start=DAYS[1], end=DAYS[1]).json()

    assert body["activity"]["days"] == [DAYS[1]]
    assert body["activity"]["messages"] == [3]


def test_default_range_is_the_last_two_weeks(staff_client: Any, seeded: dict[str, Any]) -> None:
    body = _get(staff_client).json()

    assert len(body["activity"]["days"]) == 14


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"start": "2026-13-01"}, "start", "start must be a date as YYYY-MM-DD; got '2026-13-01'"),
        ({"end": "yesterday"}, "end", "end must be a date as YYYY-MM-DD; got 'yesterday'"),
        (
            {"start": "2026-03-05", "end": "2026-03-01"},
            "end",
            "end (2026-03-01) is before start (2026-03-05)",
        ),
        (
            {"start": "2025-01-01", "end": "2026-03-01"},
            "end",
            "the range is 425 days; at most 366 are allowed",
        ),
        ({"agent": "nobody"}, "agent", "unknown agent 'nobody'"),
        ({"days": "7"}, "days", "unknown parameter 'days' (use agent, start, end)"),
    ],
)
def test_bad_parameters_answer_400(
    staff_client: Any, seeded: dict[str, Any], params: dict[str, str], field: str, message: str
) -> None:
    response = _get(staff_client, **params)

    assert response.status_code == 400
    assert response.json() == {"error": {"code": "invalid", "message": message, "field": field}}


def test_a_repeated_parameter_answers_400(staff_client: Any, seeded: dict[str, Any]) -> None:
    response = staff_client.get(f"{DATA}?agent=support&agent=shop")

    assert response.status_code == 400
    assert response.json()["error"]["field"] == "agent"


def test_anonymous_and_non_staff_are_sent_to_the_login(client: Any, django_user_model: Any) -> None:
    for url in (DATA, reverse("agentflow-analytics")):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith("/admin/login/")

    client.force_login(django_user_model.objects.create_user("visitor", password="visitor-password-1"))
    response = client.get(DATA)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_staff_without_the_view_permission_get_403(client: Any, django_user_model: Any) -> None:
    client.force_login(
        django_user_model.objects.create_user("intern", password="intern-password-1", is_staff=True)
    )

    assert client.get(DATA).status_code == 403
    assert client.get(reverse("agentflow-analytics")).status_code == 403


def test_the_page_links_the_endpoint_and_the_vendored_chart_library(staff_client: Any, seeded: Any) -> None:
    response = staff_client.get(
        reverse("agentflow-analytics"), {"agent": "support", "start": START, "end": END}
    )

    assert response.status_code == 200
    html = response.content.decode()
    assert 'data-url="/admin/analytics/data"' in html
    assert "/static/agentflow/vendor/chart.umd.min.js" in html
    assert '<option value="support" selected>' in html
    assert 'value="2026-03-01"' in html


def test_the_page_shows_a_bad_parameter(staff_client: Any) -> None:
    response = staff_client.get(reverse("agentflow-analytics"), {"start": "nope"})

    assert response.status_code == 400
    assert "start must be a date as YYYY-MM-DD" in response.content.decode()


def test_the_admin_index_links_the_dashboard(staff_client: Any) -> None:
    html = staff_client.get(reverse("admin:index")).content.decode()

    assert f'href="{reverse("agentflow-analytics")}"' in html


def test_counts_come_from_stored_rows(staff_client: Any, seeded: dict[str, Any]) -> None:
    """A row added changes the figure: the endpoint reads the database, not a cache."""
    thread = Message.objects.filter(user__external_id="alice", thread__topic="Login broken").first().thread
    Message.objects.create(
        user=thread.user, session=thread.session, thread=thread, role=Message.Role.USER, content="again"
    )
    body = _get(staff_client, agent="support").json()

    assert body["activity"]["user_messages"][-1] == 1
