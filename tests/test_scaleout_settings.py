"""The settings that decide how many processes fit on one PostgreSQL and one Redis, from the environment:
the database pool (min, max, wait), PgBouncer's transaction mode and the channel layer's capacity."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from agentflow_project.runtime import database_settings, worker_pool_max

BASE_DIR = Path(__file__).resolve().parent.parent
URL = "postgresql://agentflow:secret@db.example:5432/agentflow"
VARIABLES = (
    "AGENTFLOW_WORKER_CONCURRENCY",
    "AGENTFLOW_DB_POOL_MAX",
    "AGENTFLOW_DB_POOL_MIN",
    "AGENTFLOW_DB_POOL_TIMEOUT_SECONDS",
    "AGENTFLOW_DB_EXTERNAL_POOLER",
    "AGENTFLOW_DB_PREPARED_STATEMENTS",
)


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DATABASE_URL", URL)
    return monkeypatch


def test_the_defaults_follow_the_worker_concurrency(env: pytest.MonkeyPatch) -> None:
    config = database_settings()

    # 64 threads share 36 connections: a turn holds none while it awaits the LLM (agentflow.loops).
    assert config["OPTIONS"]["pool"] == {"min_size": 1, "max_size": 36, "timeout": 20}
    assert config["OPTIONS"]["options"] == "-c hnsw.iterative_scan=relaxed_order"
    assert not config.get("DISABLE_SERVER_SIDE_CURSORS")

    env.setenv("AGENTFLOW_WORKER_CONCURRENCY", "8")
    assert database_settings()["OPTIONS"]["pool"] == {"min_size": 1, "max_size": 12, "timeout": 20}
    env.setenv("AGENTFLOW_WORKER_CONCURRENCY", "200")
    assert database_settings()["OPTIONS"]["pool"] == {"min_size": 1, "max_size": 36, "timeout": 20}


def test_pool_min_max_and_wait_are_set_per_process(env: pytest.MonkeyPatch) -> None:
    env.setenv("AGENTFLOW_DB_POOL_MAX", "4")
    env.setenv("AGENTFLOW_DB_POOL_MIN", "0")
    env.setenv("AGENTFLOW_DB_POOL_TIMEOUT_SECONDS", "5")

    assert database_settings()["OPTIONS"]["pool"] == {"min_size": 0, "max_size": 4, "timeout": 5}


def test_a_pool_of_one_is_no_pool(env: pytest.MonkeyPatch) -> None:
    env.setenv("AGENTFLOW_DB_POOL_MAX", "1")

    assert "pool" not in database_settings()["OPTIONS"]


@pytest.mark.parametrize(
    ("variables", "message"),
    [
        (
            {"AGENTFLOW_DB_POOL_MIN": "5", "AGENTFLOW_DB_POOL_MAX": "4"},
            "AGENTFLOW_DB_POOL_MIN (5) must not exceed AGENTFLOW_DB_POOL_MAX (4)",
        ),
        ({"AGENTFLOW_DB_POOL_MIN": "-1"}, "AGENTFLOW_DB_POOL_MIN must be at least 0; got -1"),
        ({"AGENTFLOW_DB_POOL_MIN": "one"}, "AGENTFLOW_DB_POOL_MIN must be a whole number; got 'one'"),
        ({"AGENTFLOW_DB_POOL_TIMEOUT_SECONDS": "0"}, "AGENTFLOW_DB_POOL_TIMEOUT_SECONDS must be at least 1"),
        (
            {"AGENTFLOW_DB_POOL_TIMEOUT_SECONDS": "301"},
            "AGENTFLOW_DB_POOL_TIMEOUT_SECONDS must be at most 300",
        ),
        (
            {"AGENTFLOW_DB_EXTERNAL_POOLER": "sometimes"},
            "AGENTFLOW_DB_EXTERNAL_POOLER must be a boolean",
        ),
        (
            {"AGENTFLOW_DB_PREPARED_STATEMENTS": "twice"},
            "AGENTFLOW_DB_PREPARED_STATEMENTS must be a boolean",
        ),
    ],
)
def test_bad_values_name_the_variable(
    env: pytest.MonkeyPatch, variables: dict[str, str], message: str
) -> None:
    for name, value in variables.items():
        env.setenv(name, value)

    with pytest.raises(ImproperlyConfigured) as info:
        database_settings()

    assert str(info.value).startswith(message)


def test_behind_pgbouncer_no_session_state_and_no_server_side_cursors(
    env: pytest.MonkeyPatch,
) -> None:
    env.setenv("AGENTFLOW_DB_EXTERNAL_POOLER", "true")

    config = database_settings()

    assert config["DISABLE_SERVER_SIDE_CURSORS"] is True
    assert "options" not in config["OPTIONS"]  # PgBouncer refuses (or drops) the startup parameter
    assert "prepare_threshold" not in config["OPTIONS"]  # a statement may land on another server connection
    assert "server_side_binding" not in config["OPTIONS"]
    # 64 threads share 36 connections: a turn holds none while it awaits the LLM (agentflow.loops).
    assert config["OPTIONS"]["pool"] == {"min_size": 1, "max_size": 36, "timeout": 20}


def test_statements_are_bound_on_the_server_and_prepared_unless_turned_off(env: pytest.MonkeyPatch) -> None:
    options = database_settings()["OPTIONS"]
    assert (options["server_side_binding"], options["prepare_threshold"]) == (True, 2)

    env.setenv("AGENTFLOW_DB_PREPARED_STATEMENTS", "false")
    options = database_settings()["OPTIONS"]
    assert "server_side_binding" not in options and "prepare_threshold" not in options

    # PgBouncer 1.21+ with max_prepared_statements keeps them across server connections: asked for.
    env.setenv("AGENTFLOW_DB_EXTERNAL_POOLER", "true")
    env.setenv("AGENTFLOW_DB_PREPARED_STATEMENTS", "true")
    options = database_settings()["OPTIONS"]
    assert (options["server_side_binding"], options["prepare_threshold"]) == (True, 2)


def _settings_value(expression: str, tmp_path: Path, **variables: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AGENTFLOW_", "DJANGO_"))}
    env.update(
        {
            "AGENTFLOW_SKIP_DOTENV": "1",
            "AGENTFLOW_DATA_DIR": str(tmp_path),
            "DJANGO_DEBUG": "true",
            "DATABASE_URL": URL,
            "REDIS_URL": "redis://127.0.0.1:1/0",
            **variables,
        }
    )
    code = f"import agentflow_project.settings as s; print({expression})"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )


def test_the_channel_layer_capacity_comes_from_the_environment(tmp_path: Path) -> None:
    expression = "s.CHANNEL_LAYERS['default']['CONFIG']['capacity']"

    assert _settings_value(expression, tmp_path).stdout.strip() == "10000"
    assert _settings_value(expression, tmp_path, AGENTFLOW_CHANNEL_CAPACITY="5000").stdout.strip() == "5000"
    too_small = _settings_value(expression, tmp_path, AGENTFLOW_CHANNEL_CAPACITY="50")
    assert too_small.returncode != 0
    assert "AGENTFLOW_CHANNEL_CAPACITY must be at least 100; got 50" in too_small.stderr


def test_several_worker_processes_share_the_connection_budget_with_the_web_server() -> None:
    assert worker_pool_max(workers=1, concurrency=64, web_pool=36) == 36  # one worker: its usual pool
    assert worker_pool_max(workers=2, concurrency=32, web_pool=36) == 27  # (90 - 36) // 2
    assert worker_pool_max(workers=4, concurrency=8, web_pool=36) == 12  # its own 8 + 4 fits
    with pytest.raises(ImproperlyConfigured, match="16 worker processes and a web pool of 36 do not fit"):
        worker_pool_max(workers=16, concurrency=64, web_pool=36)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"workers": 0}, "--workers must be from 1 to 16; got 0"),
        ({"workers": 17}, "--workers must be from 1 to 16; got 17"),
        ({"workers": 16}, "16 worker processes and a web pool of"),
    ],
)
def test_agentflow_run_refuses_worker_counts_that_cannot_run(
    options: dict[str, int], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from django.core.management import CommandError, call_command

    monkeypatch.delenv("AGENTFLOW_DB_POOL_MAX", raising=False)
    with pytest.raises(CommandError, match=message):
        call_command("agentflow_run", **options)
