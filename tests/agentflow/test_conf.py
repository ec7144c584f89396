"""``agentflow.conf``: AgentFlow's Django settings with their defaults, for a host project that sets few."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from agentflow.conf import DEFAULT_RATE_LIMITS, anthropic_api_key, conf, conf_reset, redis_url
from agentflow.errors import ConfigError


@pytest.fixture
def no_settings(settings: Any) -> Iterator[Any]:
    """Deleting a setting sends no ``setting_changed`` (pytest-django), so the cache is reset by hand,
    before and after: the suite's own ``AGENTFLOW`` must be read again by the next test."""
    conf_reset()
    yield settings
    conf_reset()


def test_a_project_that_sets_nothing_gets_every_default(no_settings: Any) -> None:
    del no_settings.AGENTFLOW
    del no_settings.REDIS_URL
    del no_settings.ANTHROPIC_API_KEY
    conf_reset()
    values = conf()
    assert (values.DEFAULT_AGENT, values.DEMO_PAGE, values.REST_WAIT_SECONDS) == ("agentflow", False, 30)
    assert values.RATE_LIMITS == DEFAULT_RATE_LIMITS
    assert (redis_url(), anthropic_api_key()) == ("redis://127.0.0.1:6379/0", "")


def test_rate_limits_name_only_what_they_change(settings: Any) -> None:
    settings.AGENTFLOW = {"RATE_LIMITS": {"IP_BURST": 7}}
    assert conf().RATE_LIMITS == {**DEFAULT_RATE_LIMITS, "IP_BURST": 7}


@pytest.mark.parametrize(
    ("limits", "problem"),
    [
        ({"IP_BURTS": 7}, "unknown rate limit(s) ['IP_BURTS']"),
        ({"IP_BURST": "many"}, "RATE_LIMITS"),
        ("600", "RATE_LIMITS"),
    ],
)
def test_a_bad_rate_limit_is_a_config_error_naming_it(settings: Any, limits: Any, problem: str) -> None:
    settings.AGENTFLOW = {"RATE_LIMITS": limits}
    with pytest.raises(ConfigError) as caught:
        conf()
    assert problem in str(caught.value)
