"""Settings from the environment: the typed helpers, and start-up failures naming the bad variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from django.core.exceptions import ImproperlyConfigured

from agentflow_project.env import env_bool, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent
UNREACHABLE_DB = "postgresql://agentflow:secret@127.0.0.1:1/agentflow"
UNREACHABLE_REDIS = "redis://127.0.0.1:1/0"


# --- helpers ---------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", ["1", "true", "TRUE", " yes ", "on"])
def test_env_bool_true(monkeypatch, raw):
    monkeypatch.setenv("X", raw)

    assert env_bool("X") is True


@pytest.mark.parametrize("raw", ["0", "false", "No", "off", ""])
def test_env_bool_false(monkeypatch, raw):
    monkeypatch.setenv("X", raw)

    assert env_bool("X", True) is False


def test_env_bool_default(monkeypatch):
    monkeypatch.delenv("X", raising=False)

    assert env_bool("X") is False
    assert env_bool("X", True) is True


def test_env_bool_rejects_other_words(monkeypatch):
    monkeypatch.setenv("X", "maybe")

    with pytest.raises(ImproperlyConfigured) as info:
        env_bool("X")

    assert str(info.value) == "X must be a boolean (true/false, 1/0, yes/no, on/off); got 'maybe'"


def test_env_int(monkeypatch):
    monkeypatch.delenv("N", raising=False)
    assert env_int("N", 7) == 7
    monkeypatch.setenv("N", "")
    assert env_int("N", 7) == 7
    monkeypatch.setenv("N", " 42 ")
    assert env_int("N", 7, minimum=1, maximum=42) == 42
    monkeypatch.setenv("N", "1")
    assert env_int("N", 7, minimum=1, maximum=42) == 1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("abc", "N must be a whole number; got 'abc'"),
        ("4.5", "N must be a whole number; got '4.5'"),
        ("0", "N must be at least 1; got 0"),
        ("43", "N must be at most 42; got 43"),
    ],
)
def test_env_int_rejects(monkeypatch, raw, message):
    monkeypatch.setenv("N", raw)

    with pytest.raises(ImproperlyConfigured) as info:
        env_int("N", 7, minimum=1, maximum=42)

    assert str(info.value) == message


def test_env_list(monkeypatch):
    default = ["localhost"]
    monkeypatch.delenv("HOSTS", raising=False)
    result = env_list("HOSTS", default)
    assert result == ["localhost"] and result is not default
    monkeypatch.setenv("HOSTS", " a.example.com , b.example.com ")
    assert env_list("HOSTS", default) == ["a.example.com", "b.example.com"]


@pytest.mark.parametrize("raw", ["a,,b", "a,", ", a", " , "])
def test_env_list_rejects_empty_items(monkeypatch, raw):
    monkeypatch.setenv("HOSTS", raw)

    with pytest.raises(
        ImproperlyConfigured, match="HOSTS must be a comma-separated list with no empty items"
    ):
        env_list("HOSTS", [])


def test_env_str(monkeypatch):
    monkeypatch.setenv("S", "  value  ")
    assert env_str("S") == "value"
    monkeypatch.setenv("S", "   ")
    assert env_str("S", "fallback") == "fallback"


# --- start-up --------------------------------------------------------------------------------


def manage_check(**env: str) -> subprocess.CompletedProcess[str]:
    """``manage.py check`` with the project's own settings and a controlled environment."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "AGENT", "DATABASE_URL", "REDIS_URL", "ANTHROPIC_", "ALLOWED_HOSTS"))
    }
    base.update(
        {
            "DJANGO_SETTINGS_MODULE": "agentflow_project.settings",
            "AGENTFLOW_SKIP_DOTENV": "1",
            "DJANGO_DEBUG": "false",
            "DJANGO_SECRET_KEY": "a-long-random-secret-key-for-the-check-subprocess-0123456789",
            "DATABASE_URL": UNREACHABLE_DB,
            "REDIS_URL": UNREACHABLE_REDIS,
        }
    )
    base.update(env)
    base = {k: v for k, v in base.items() if v is not None}
    return subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=BASE_DIR,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_check_passes_with_a_valid_environment():
    result = manage_check()

    assert result.returncode == 0, result.stderr
    assert "System check identified no issues" in result.stdout


def test_production_needs_a_secret_key():
    result = manage_check(DJANGO_SECRET_KEY=None)

    assert result.returncode != 0
    assert "ImproperlyConfigured: DJANGO_SECRET_KEY must be set" in result.stderr


def test_debug_runs_without_a_secret_key():
    result = manage_check(DJANGO_SECRET_KEY=None, DJANGO_DEBUG="true")

    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"DATABASE_URL": "mysql://x"}, "DATABASE_URL must be a PostgreSQL URL"),
        (
            {"REDIS_URL": "http://x"},
            "REDIS_URL must start with redis://, rediss:// or unix://; got 'http://x'",
        ),
        ({"DJANGO_DEBUG": "maybe"}, "DJANGO_DEBUG must be a boolean"),
        ({"AGENTFLOW_WORKER_CONCURRENCY": "0"}, "AGENTFLOW_WORKER_CONCURRENCY must be at least 1; got 0"),
        ({"ALLOWED_HOSTS": "example.com,,"}, "ALLOWED_HOSTS must be a comma-separated list"),
    ],
)
def test_bad_variables_stop_start_up_naming_the_variable(env, message):
    result = manage_check(**env)

    assert result.returncode != 0
    assert f"ImproperlyConfigured: {message}" in result.stderr


# --- importing the settings starts nothing --------------------------------------------------------


def test_importing_the_settings_starts_no_database_server(tmp_path):
    """With no DATABASE_URL the embedded PostgreSQL starts on the first connection, not on import."""
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "DJANGO_SETTINGS_MODULE")}
    env.update(
        {
            "AGENTFLOW_DATA_DIR": str(tmp_path),
            "AGENTFLOW_SKIP_DOTENV": "1",
            "DJANGO_DEBUG": "true",
            "REDIS_URL": UNREACHABLE_REDIS,
        }
    )
    code = (
        "import agentflow_project.settings as s;"
        "print(s.DATABASES['default']['ENGINE'], s.DATABASES['default']['HOST'])"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["agentflow_project.embedded_db", str(tmp_path.resolve() / "postgres")]
    assert not (tmp_path / "postgres" / "postmaster.pid").exists()
    assert not (tmp_path / "postgres" / "PG_VERSION").exists()  # not even initialised
