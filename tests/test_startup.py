"""What a deployment says at start-up about the services it uses (``runtime.describe_services``)."""

from __future__ import annotations

from typing import Any

import pytest

from agentflow_project import runtime


def test_an_external_database_and_redis_are_named_with_their_secrets_masked(
    settings: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://app:s3cret@db.example.com:5432/agentflow")
    database = {
        "USER": "app",
        "PASSWORD": "s3cret",
        "HOST": "db.example.com",
        "PORT": 5432,
        "NAME": "agentflow",
    }
    settings.REDIS_URL, settings.REDIS_SOURCE = "redis://:hunter2@cache.example.com:6379/0", "REDIS_URL"
    settings.ANTHROPIC_API_KEY, settings.ANTHROPIC_BASE_URL = "sk-ant-secret", ""

    lines = runtime.describe_services(llm_model="claude-sonnet-5-5", database=database)

    assert lines == [
        "database: PostgreSQL app@db.example.com:5432/agentflow (DATABASE_URL)",
        "redis: redis://:***@cache.example.com:6379/0 (REDIS_URL)",
        "LLM: online, model claude-sonnet-5-5",
    ]
    assert not any(secret in "".join(lines) for secret in ("s3cret", "hunter2", "sk-ant-secret"))


def test_the_embedded_services_and_offline_mode(settings: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DATABASE_URL", raising=False)
    settings.REDIS_URL, settings.REDIS_SOURCE = "redis://:pw@127.0.0.1:6390/0", "embedded"
    settings.ANTHROPIC_API_KEY = ""

    lines = runtime.describe_services(llm_model=None)

    assert lines == [
        f"database: embedded PostgreSQL in {runtime.postgres_dir()}",
        "redis: redis://:***@127.0.0.1:6390/0 (embedded Valkey)",
        "LLM: OFFLINE (no ANTHROPIC_API_KEY): replies say so and offer a human",
    ]


def test_a_gateway_is_named_without_its_credentials(settings: Any) -> None:
    settings.ANTHROPIC_API_KEY = "sk-ant-secret"
    settings.ANTHROPIC_BASE_URL = "https://user:token@gateway.example.com/anthropic"

    assert runtime.describe_services(llm_model="claude-haiku-5-5")[2] == (
        "LLM: online, model claude-haiku-5-5 via https://user:***@gateway.example.com/anthropic"
    )
