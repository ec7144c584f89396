"""``agentflow.conf``: AgentFlow's Django settings with their defaults, for a host project that sets few."""

from __future__ import annotations

from typing import Any

import pytest

from agentflow.conf import DEFAULT_RATE_LIMITS, anthropic_api_key, conf, redis_url
from agentflow.errors import ConfigError


def test_a_project_that_sets_nothing_gets_every_default(settings: Any) -> None:
    del settings.AGENTFLOW
    del settings.REDIS_URL
    del settings.ANTHROPIC_API_KEY
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
