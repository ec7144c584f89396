"""Production settings (issue 12): ``check --deploy`` is clean with the environment docs/operations.md
documents, the demo page is off unless asked for, ``.env`` is private, the embedded Valkey has a
password."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_settings_env import BASE_DIR, UNREACHABLE_DB, UNREACHABLE_REDIS

# The production environment of docs/operations.md ("Running in production"), with unreachable
# servers: the checks below never connect.
PRODUCTION = {
    "DJANGO_DEBUG": "false",
    "DJANGO_SECRET_KEY": "k7#Rq2v!Lp9xZ_w4bN8mT1cY6uE3oH5jS0aF-gD2iK7lP9qW4eR6tY8uI0oP3aS5dF",
    "ALLOWED_HOSTS": "chat.example.com",
    "CSRF_TRUSTED_ORIGINS": "https://chat.example.com",
    "DJANGO_SECURE_SSL_REDIRECT": "true",
    "DJANGO_SESSION_COOKIE_SECURE": "true",
    "DJANGO_CSRF_COOKIE_SECURE": "true",
    "DJANGO_SECURE_HSTS_SECONDS": "31536000",
    "DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS": "true",
    "DJANGO_SECURE_HSTS_PRELOAD": "true",
    "DJANGO_SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto",
    "DATABASE_URL": UNREACHABLE_DB,
    "REDIS_URL": UNREACHABLE_REDIS,
}


def manage(*args: str, **env: str | None) -> subprocess.CompletedProcess[str]:
    """``manage.py <args>`` with the project's settings and only the given environment."""
    base = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DJANGO_", "AGENT", "DATABASE_URL", "REDIS_URL", "ANTHROPIC_", "ALLOWED_HOSTS"))
        and k != "CSRF_TRUSTED_ORIGINS"
    }
    base.update({"DJANGO_SETTINGS_MODULE": "agentflow_project.settings", "AGENTFLOW_SKIP_DOTENV": "1"})
    base.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )


# --- check --deploy ------------------------------------------------------------------------------


def test_check_deploy_is_clean_with_the_documented_production_environment() -> None:
    result = manage("check", "--deploy", "--fail-level", "WARNING", **PRODUCTION)

    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_check_deploy_names_what_is_missing_without_the_https_variables() -> None:
    plain = {k: v for k, v in PRODUCTION.items() if not k.startswith("DJANGO_SECURE") and "COOKIE" not in k}

    result = manage("check", "--deploy", "--fail-level", "WARNING", **plain)

    assert result.returncode != 0
    for warning in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert warning in result.stderr


def test_the_https_variables_reach_the_settings() -> None:
    code = (
        "from django.conf import settings as s; print(s.SECURE_SSL_REDIRECT, s.SESSION_COOKIE_SECURE,"
        " s.CSRF_COOKIE_SECURE, s.SECURE_HSTS_SECONDS, s.SECURE_HSTS_INCLUDE_SUBDOMAINS,"
        " s.SECURE_HSTS_PRELOAD, s.SECURE_PROXY_SSL_HEADER, s.CSRF_TRUSTED_ORIGINS, s.SECURE_REDIRECT_EXEMPT)"
    )

    result = manage("shell", "--no-imports", "-c", code, **PRODUCTION)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == (
        "True True True 31536000 True True ('HTTP_X_FORWARDED_PROTO', 'https')"
        " ['https://chat.example.com'] ['^api/health(/live|/ready)?$']"
    )


def test_development_defaults_stay_on_plain_http() -> None:
    code = "from django.conf import settings as s; print(s.SECURE_SSL_REDIRECT, s.SESSION_COOKIE_SECURE, s.SECURE_HSTS_SECONDS, s.SECURE_PROXY_SSL_HEADER)"

    result = manage(
        "shell",
        "--no-imports",
        "-c",
        code,
        DJANGO_DEBUG="true",
        DATABASE_URL=UNREACHABLE_DB,
        REDIS_URL=UNREACHABLE_REDIS,
    )

    assert result.stdout.strip() == "False False 0 None"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"DJANGO_SECURE_PROXY_SSL_HEADER": "X-Forwarded-Proto: https"},
            "DJANGO_SECURE_PROXY_SSL_HEADER must be a header name",
        ),
        ({"DJANGO_SECURE_HSTS_SECONDS": "-1"}, "DJANGO_SECURE_HSTS_SECONDS must be at least 0; got -1"),
        ({"DJANGO_SESSION_COOKIE_SECURE": "sure"}, "DJANGO_SESSION_COOKIE_SECURE must be a boolean"),
    ],
)
def test_bad_https_variables_stop_start_up_naming_the_variable(env: dict[str, str], message: str) -> None:
    result = manage("check", **{**PRODUCTION, **env})

    assert result.returncode != 0
    assert f"ImproperlyConfigured: {message}" in result.stderr


# --- the demo page -------------------------------------------------------------------------------

# With the page on, the token view would reach the session store (unreachable here): the widget tests
# cover that case; here only the flag is read.
DEMO_TOKEN = (
    "from django.test import Client; from django.conf import settings as s; on = s.AGENTFLOW['DEMO_PAGE'];"
    " print(on, 'on' if on else Client(SERVER_NAME='localhost').get('/demo/chat-token').status_code)"
)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"DJANGO_DEBUG": "false"}, "False 404"),
        ({"DJANGO_DEBUG": "false", "AGENTFLOW_DEMO_PAGE": "false"}, "False 404"),
        ({"DJANGO_DEBUG": "true"}, "True on"),
        ({"DJANGO_DEBUG": "false", "AGENTFLOW_DEMO_PAGE": "true"}, "True on"),
        ({"DJANGO_DEBUG": "true", "AGENTFLOW_DEMO_PAGE": "false"}, "False 404"),
    ],
)
def test_the_demo_page_is_off_in_production_unless_asked_for(env: dict[str, str], expected: str) -> None:
    base = {**PRODUCTION, "ALLOWED_HOSTS": "localhost", "DJANGO_SECURE_SSL_REDIRECT": "false"}

    result = manage("shell", "--no-imports", "-c", DEMO_TOKEN, **{**base, **env})

    assert result.stdout.strip() == expected, result.stderr[-2000:]


# --- .env ----------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_writes_a_private_env_file(tmp_path: Path) -> None:
    shutil.copy(BASE_DIR / "Makefile", tmp_path / "Makefile")

    result = subprocess.run(
        ["make", "--no-print-directory", ".env"], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )

    assert result.returncode == 0, result.stderr
    env_file = tmp_path / ".env"
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    lines = env_file.read_text().splitlines()
    assert lines[0] == "DJANGO_DEBUG=true"
    assert lines[1].startswith("DJANGO_SECRET_KEY=") and len(lines[1]) > 60


# --- the embedded Valkey's password --------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(port: int, *commands: bytes) -> list[bytes]:
    from agentflow_project.runtime import _redis_says

    replies = _redis_says(port, *commands, timeout=2)
    assert replies is not None
    return replies


@pytest.fixture
def embedded_valkey(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """An embedded Valkey of its own (data folder, port), stopped afterwards."""
    from agentflow_project import runtime

    monkeypatch.setenv("AGENTFLOW_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("AGENTFLOW_EMBEDDED_REDIS_PORT", str(_free_port()))
    yield runtime
    runtime.stop_valkey()


def test_the_embedded_valkey_requires_a_password_kept_private_in_the_data_folder(embedded_valkey) -> None:
    runtime = embedded_valkey
    port = runtime.valkey_port()

    url = runtime.ensure_valkey()

    password_file = runtime.valkey_dir() / "password"
    password = password_file.read_text().strip()
    assert stat.S_IMODE(password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(runtime.valkey_dir().stat().st_mode) == 0o700
    assert len(password) >= 40
    assert url == f"redis://:{password}@127.0.0.1:{port}/0"
    # Another local process without the password can neither read nor publish into a chat.
    assert _say(port, b"PING")[0].startswith(b"-NOAUTH")
    assert _say(port, b"PUBLISH agentflow.chat fake-staff-message")[0].startswith(b"-NOAUTH")
    assert _say(port, b"AUTH wrong-password")[0].startswith(b"-WRONGPASS")
    assert _say(port, b"AUTH " + password.encode(), b"PING") == [b"+OK", b"+PONG"]
    # Nor from its command line: the password is in a 0600 config file.
    pid = int((runtime.valkey_dir() / "valkey.pid").read_text())
    assert password.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert stat.S_IMODE((runtime.valkey_dir() / "valkey.conf").stat().st_mode) == 0o600


def test_the_next_process_attaches_with_the_same_password(embedded_valkey) -> None:
    runtime = embedded_valkey
    first = runtime.ensure_valkey()
    pid = (runtime.valkey_dir() / "valkey.pid").read_text()

    again = runtime.ensure_valkey()

    assert again == first
    assert (runtime.valkey_dir() / "valkey.pid").read_text() == pid  # attached, not started twice


def test_the_url_works_for_the_redis_client(embedded_valkey) -> None:
    import redis

    client = redis.Redis.from_url(embedded_valkey.ensure_valkey())
    try:
        assert client.ping() is True
    finally:
        client.close()


def test_a_server_on_the_port_that_refuses_the_password_is_a_clear_error(embedded_valkey) -> None:
    from django.core.exceptions import ImproperlyConfigured

    runtime = embedded_valkey
    runtime.ensure_valkey()
    (runtime.valkey_dir() / "password").write_text("another-password\n")

    with pytest.raises(ImproperlyConfigured, match="does not accept the password in"):
        runtime.ensure_valkey()


def test_our_own_valkey_from_before_passwords_gets_one(embedded_valkey) -> None:
    runtime = embedded_valkey
    url = runtime.ensure_valkey()
    password = (runtime.valkey_dir() / "password").read_text().strip()
    port = runtime.valkey_port()
    assert _say(port, b"AUTH " + password.encode(), b"CONFIG SET requirepass ''")[0] == b"+OK"

    assert runtime.ensure_valkey() == url

    assert _say(port, b"PING")[0].startswith(b"-NOAUTH")


def test_redacted_url_hides_the_password() -> None:
    from agentflow_project.runtime import redacted_url

    assert redacted_url("redis://:s3cret@127.0.0.1:6390/0") == "redis://:***@127.0.0.1:6390/0"
    assert redacted_url("redis://user:s3cret@db:6379/1") == "redis://user:***@db:6379/1"
    assert redacted_url("redis://127.0.0.1:6379/0") == "redis://127.0.0.1:6379/0"
