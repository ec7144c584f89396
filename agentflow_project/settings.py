"""Django settings, read from the environment (and a `.env` file beside manage.py).

The environment variables are listed in docs/configuration.md. A bad value raises
ImproperlyConfigured naming the variable.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured
from dotenv import load_dotenv

from agentflow import limits as _limits
from agentflow.conf import REDIS_MAX_CONNECTIONS
from agentflow.logs import logging_config

from . import runtime
from .env import env_bool, env_int, env_list, env_map, env_str

BASE_DIR = Path(__file__).resolve().parent.parent

# Real environment variables win over the .env file (which the test suite skips).
if not env_bool("AGENTFLOW_SKIP_DOTENV", False):
    load_dotenv(BASE_DIR / ".env", override=False)

DEBUG = env_bool("DJANGO_DEBUG", False)
SECRET_KEY = env_str("DJANGO_SECRET_KEY")
if not SECRET_KEY:
    if not DEBUG:
        raise ImproperlyConfigured(
            "DJANGO_SECRET_KEY must be set (a long random string) unless DJANGO_DEBUG=true"
        )
    SECRET_KEY = "agentflow-insecure-development-key-do-not-use-in-production"
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

# HTTPS (docs/operations.md, "Running in production"). Off by default, so that `make run` works over
# plain HTTP; production sets them (manage.py check --deploy is clean with the documented set).
SECURE_SSL_REDIRECT = env_bool("DJANGO_SECURE_SSL_REDIRECT", False)
# Load balancers and Kubernetes probe the health routes over plain HTTP.
SECURE_REDIRECT_EXEMPT = [r"^api/health(/live|/ready)?$"]
SESSION_COOKIE_SECURE = env_bool("DJANGO_SESSION_COOKIE_SECURE", False)
CSRF_COOKIE_SECURE = env_bool("DJANGO_CSRF_COOKIE_SECURE", False)
SECURE_HSTS_SECONDS = env_int("DJANGO_SECURE_HSTS_SECONDS", 0, minimum=0)
SECURE_HSTS_INCLUDE_SUBDOMAINS = env_bool("DJANGO_SECURE_HSTS_INCLUDE_SUBDOMAINS", False)
SECURE_HSTS_PRELOAD = env_bool("DJANGO_SECURE_HSTS_PRELOAD", False)
# Behind a TLS-terminating proxy: the header it sets on HTTPS requests, e.g. X-Forwarded-Proto (its
# value must be "https"). Only set this when the proxy always sets or strips that header.
_proxy_header = env_str("DJANGO_SECURE_PROXY_SSL_HEADER")
if _proxy_header:
    if not all(ch.isalnum() or ch == "-" for ch in _proxy_header):
        raise ImproperlyConfigured(
            f"DJANGO_SECURE_PROXY_SSL_HEADER must be a header name such as X-Forwarded-Proto; got {_proxy_header!r}"
        )
    SECURE_PROXY_SSL_HEADER = ("HTTP_" + _proxy_header.upper().replace("-", "_"), "https")

INSTALLED_APPS = [
    "daphne",
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",
    "channels",
    "ninja",
    "axes",
    "agentflow",
    "conversations",
    "intents",
    "memory",
    "agentflow_project",  # the deployment's own commands (agentflow_run, agentflow_services)
]

MIDDLEWARE = [
    # An id for each request's logs (X-Request-ID), carried into the turn it queues.
    "agentflow.web.http.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # /api/: paths checked byte by byte, JSON errors only, Cache-Control: no-store.
    "agentflow.web.http.ApiHttpMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Client IP and route of each request for the audit trail (conversations/audit.py).
    "conversations.audit.AuditContextMiddleware",
    # Admin login throttling; django-axes wants its middleware last (of those that can refuse a request).
    "axes.middleware.AxesMiddleware",
    # The console's times in the staff member's own zone (the agentflow_tz cookie its pages set).
    # Synchronous only, and last on purpose: every middleware above it then runs in the request's one
    # thread, with a single switch to the event loop for the (async) API views. Anywhere higher, the
    # middlewares below it ran in async mode, each of their request and response steps one more hop
    # between the loop and that thread (docs/operations.md, "Web process CPU").
    "conversations.timezones.StaffTimezoneMiddleware",
]

# django-axes checks every login before the password does: after AGENTFLOW_ADMIN_LOGIN_FAILURES
# failures for one username from one IP, that pair is locked out for AGENTFLOW_ADMIN_LOCKOUT_MINUTES.
AUTHENTICATION_BACKENDS = [
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
AXES_ENABLED = env_bool("AGENTFLOW_ADMIN_LOGIN_THROTTLE", True)
AXES_FAILURE_LIMIT = env_int("AGENTFLOW_ADMIN_LOGIN_FAILURES", 5, minimum=1, maximum=1000)
AXES_COOLOFF_TIME = timedelta(
    minutes=env_int("AGENTFLOW_ADMIN_LOCKOUT_MINUTES", 15, minimum=1, maximum=10080)
)
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
AXES_RESET_ON_SUCCESS = True
AXES_HANDLER = "axes.handlers.database.AxesDatabaseHandler"  # attempts in PostgreSQL, shown in the admin
AXES_VERBOSE = False

ROOT_URLCONF = "agentflow_project.urls"
ASGI_APPLICATION = "agentflow_project.asgi.application"
WSGI_APPLICATION = None

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "agentflow_project" / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ],
        },
    },
]

DATABASES = {"default": runtime.database_settings()}
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

_redis = runtime.resolve_redis()
REDIS_URL = _redis.url
REDIS_SOURCE = _redis.source

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "agentflow.channel_layer.RedisChannelLayer",
        "CONFIG": {
            # redis-py 8 defaults to a 5 s socket timeout, shorter than channels-redis's 5 s blocking
            # pop: an idle WebSocket or a waiting REST call would then die with a TimeoutError.
            "hosts": [
                {
                    "address": REDIS_URL,
                    "socket_timeout": None,
                    "socket_keepalive": True,
                    # redis-py 8's default pool of 100 is too few for a busy web process.
                    "max_connections": REDIS_MAX_CONNECTIONS,
                }
            ],
            "prefix": env_str("AGENTFLOW_CHANNELS_PREFIX", "agentflow"),
            # Messages waiting per channel; a process's WebSockets share one receive channel, so a web
            # process holding many streaming sockets needs more (over it, group_send drops).
            # 1000 dropped replies' final events for 47 of 1,500 turns at 500 streaming sockets, 25 turns/s on a
            # CPU-bound web process (bench/production_load.py --load chat500); 10,000 dropped none.
            "capacity": env_int("AGENTFLOW_CHANNEL_CAPACITY", 10_000, minimum=100, maximum=100_000),
            "expiry": 60,
        },
    }
}

CACHES = {
    "default": {
        "BACKEND": "agentflow.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": env_str("AGENTFLOW_CACHE_PREFIX", "agentflow"),
        # The pool every request thread of a process shares (redis-py 8's default is 100).
        "OPTIONS": {"max_connections": REDIS_MAX_CONNECTIONS},
    }
}

# Celery: Redis broker, threads pool (LLM calls are I/O; Celery 5.7 has no asyncio pool).
CELERY_BROKER_URL = REDIS_URL
# kombu's Redis transport with one fix: the worker survives a Redis outage (agentflow_project/broker.py).
CELERY_BROKER_TRANSPORT = "agentflow_project.broker:Transport"
CELERY_RESULT_BACKEND = None
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_DEFAULT_QUEUE = env_str("AGENTFLOW_CELERY_QUEUE", "agentflow")
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_TASK_ALWAYS_EAGER = False
# Threads = turns in flight; each waits out its LLM call without a database connection (agentflow.loops).
CELERY_WORKER_CONCURRENCY = runtime.worker_concurrency()
CELERY_WORKER_POOL = "threads"
CELERY_WORKER_HIJACK_ROOT_LOGGER = False
# Redis redelivers a turn task not acknowledged after this (a worker killed mid-turn). kombu's default is
# an hour; it must stay above the longest turn and the stale-claim window (agentflow.limits: 360 s).
# max_connections: each worker thread acknowledges its own task (agentflow_project.broker.Consumer)
# through the channel's pool, kombu's default of 10 connections being too few for the threads.
CELERY_BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": int(_limits.VISIBILITY_TIMEOUT.total_seconds()),
    "max_connections": CELERY_WORKER_CONCURRENCY + 16,
}
# Acknowledgements on the task's own thread, not the event loop's (agentflow_project/broker.py).
CELERY_WORKER_CONSUMER = "agentflow_project.broker:Consumer"

AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator"},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
]

LANGUAGE_CODE = "en-us"
# Every console page shows times in this zone, in the format of formats/en/formats.py.
TIME_ZONE = env_str("AGENTFLOW_TIME_ZONE", "UTC")
FORMAT_MODULE_PATH = ["agentflow_project.formats"]
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = runtime.data_dir() / "static"  # collectstatic's target; WhiteNoise wants it to exist
STATIC_ROOT.mkdir(exist_ok=True)
STORAGES = {
    "default": {"BACKEND": "django.core.files.storage.FileSystemStorage"},
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
# Serve static files straight from the apps: no collectstatic step before the first run.
WHITENOISE_USE_FINDERS = True
WHITENOISE_AUTOREFRESH = DEBUG

_log_format = env_str("AGENTFLOW_LOG_FORMAT", "text")
if _log_format not in ("text", "json"):
    raise ImproperlyConfigured(f"AGENTFLOW_LOG_FORMAT must be text or json; got {_log_format!r}")

# --- AgentFlow --------------------------------------------------------------------------------
# The LLM key and endpoint. With no key the product runs in offline mode (see docs/operations.md).
ANTHROPIC_API_KEY = env_str("ANTHROPIC_API_KEY")
ANTHROPIC_BASE_URL = env_str("ANTHROPIC_BASE_URL")

AGENTFLOW = {
    # YAML file with the framework configuration (AgentFrameworkConfig); AGENT_* variables override it.
    "CONFIG": env_str("AGENTFLOW_CONFIG") or None,
    # The agent the un-prefixed REST paths, old chat tokens and the demo page use.
    "DEFAULT_AGENT": env_str("AGENTFLOW_DEFAULT_AGENT", "agentflow"),
    # The agents every process can run: name -> dotted path of a function returning a builder or an
    # agent ("support=myproject.agents:support_agent,shop=myproject.agents:shop_agent").
    "AGENTS": env_map("AGENTFLOW_AGENTS", {}),
    # Dotted path to the callable that builds the default agent unless AGENTS declares it.
    "AGENT_FACTORY": env_str("AGENTFLOW_AGENT_FACTORY", "agentflow.registry.build_default_agent"),
    # Dotted path to the embedding backend (an agentflow.embeddings.Embedder subclass).
    "EMBEDDER": env_str("AGENTFLOW_EMBEDDER", "agentflow.embeddings.MiniLMEmbedder"),
    # How long POST /api/users/{id}/messages waits for the turn by default (seconds).
    "REST_WAIT_SECONDS": env_int("AGENTFLOW_REST_WAIT_SECONDS", 30, minimum=0, maximum=120),
    # On SIGTERM, how long daphne drains (REST waits answered, sockets closed with 1012) before it stops.
    "WEB_DRAIN_SECONDS": env_int("AGENTFLOW_WEB_DRAIN_SECONDS", 5, minimum=0, maximum=600),
    # A streamed reply is sent to the user's sockets as delta frames at most this often (milliseconds;
    # 0: one frame per chunk the LLM sends). Each frame is a channel-layer message: see docs/configuration.md.
    "STREAM_INTERVAL_MS": env_int("AGENTFLOW_STREAM_INTERVAL_MS", 50, minimum=0, maximum=2000),
    # Queue memory writing (and other follow-up jobs) in Celery after a turn.
    "BACKGROUND_JOBS": env_bool("AGENTFLOW_BACKGROUND_JOBS", True),
    # Lifetime of the end-user chat tokens the REST API issues for the WebSocket (seconds).
    "CHAT_TOKEN_TTL_SECONDS": env_int("AGENTFLOW_CHAT_TOKEN_TTL_SECONDS", 3600, minimum=60),
    # Origins (scheme://host[:port]) of the sites whose pages may open the chat WebSocket (the widget
    # on a host site). Pages served from ALLOWED_HOSTS are always allowed; "*" allows any origin.
    "WIDGET_ORIGINS": env_list("AGENTFLOW_WIDGET_ORIGINS", []),
    # Serve /demo/: the chat widget on a sample page, each browser its own demo end user (and its own
    # rate-limit budget, so LLM spend through it is unmetered). Off unless DEBUG or asked for.
    "DEMO_PAGE": env_bool("AGENTFLOW_DEMO_PAGE", DEBUG),
    # Transport rate limits (token buckets in Redis: at most BURST at once, refilled at PER_MINUTE).
    # The per-user message limit is the agent's rate_limit_config. See docs/configuration.md.
    "RATE_LIMITS": {
        "API_KEY_PER_MINUTE": env_int("AGENTFLOW_RATE_API_KEY_PER_MINUTE", 600, minimum=0),
        "API_KEY_BURST": env_int("AGENTFLOW_RATE_API_KEY_BURST", 100, minimum=1),
        "IP_PER_MINUTE": env_int("AGENTFLOW_RATE_IP_PER_MINUTE", 600, minimum=0),
        "IP_BURST": env_int("AGENTFLOW_RATE_IP_BURST", 100, minimum=1),
        "AUTH_FAILURES_PER_MINUTE": env_int("AGENTFLOW_RATE_AUTH_FAILURES_PER_MINUTE", 5, minimum=0),
        "AUTH_FAILURES_BURST": env_int("AGENTFLOW_RATE_AUTH_FAILURES_BURST", 10, minimum=1),
        "WS_FRAMES_PER_SECOND": env_int("AGENTFLOW_WS_FRAMES_PER_SECOND", 5, minimum=0),
        "WS_FRAME_BURST": env_int("AGENTFLOW_WS_FRAME_BURST", 20, minimum=1),
        "WS_FRAME_OVERFLOW_CLOSE": env_int("AGENTFLOW_WS_FRAME_OVERFLOW_CLOSE", 20, minimum=1),
        "WS_CONNECTIONS_PER_USER": env_int("AGENTFLOW_WS_CONNECTIONS_PER_USER", 10, minimum=0),
    },
    # Dashboard cost: model=INPUT:OUTPUT US dollars per million tokens, over the defaults in
    # agentflow.conf.DEFAULT_MODEL_PRICES (e.g. "claude-sonnet-5-5=3:15,my-gateway-model=0.5:1.5").
    "MODEL_PRICES": env_map("AGENTFLOW_MODEL_PRICES", {}),
    # Readiness probe and worker heartbeat (docs/operations.md, "Health").
    "HEALTH": {
        "CHECK_TIMEOUT_SECONDS": env_int("AGENTFLOW_HEALTH_TIMEOUT_SECONDS", 2, minimum=1, maximum=30),
        "WORKER_HEARTBEAT_SECONDS": env_int("AGENTFLOW_WORKER_HEARTBEAT_SECONDS", 10, minimum=1, maximum=300),
        "WORKER_MAX_AGE_SECONDS": env_int("AGENTFLOW_WORKER_MAX_AGE_SECONDS", 30, minimum=1, maximum=3600),
        "RETRY_AFTER_SECONDS": env_int("AGENTFLOW_RETRY_AFTER_SECONDS", 5, minimum=1, maximum=3600),
    },
    # Logs (docs/operations.md, "Logs"): text lines, or JSON lines with the turn's and request's ids.
    "LOGS": {
        "FORMAT": _log_format,
        "MESSAGE_TEXT": env_bool("AGENTFLOW_LOG_MESSAGE_TEXT", False),
    },
    # Prometheus metrics (docs/operations.md, "Metrics"): who may read /metrics; the worker's port.
    "METRICS": {
        "ENABLED": env_bool("AGENTFLOW_METRICS", True),
        "ALLOWED_IPS": env_list("AGENTFLOW_METRICS_ALLOWED_IPS", ["127.0.0.1/32", "::1/128"]),
        "TOKEN": env_str("AGENTFLOW_METRICS_TOKEN"),
        "STAFF": env_bool("AGENTFLOW_METRICS_STAFF", True),
        "QUEUE": env_bool("AGENTFLOW_METRICS_QUEUE", True),
        "WORKER_PORT": env_int("AGENTFLOW_WORKER_METRICS_PORT", 0, minimum=0, maximum=65535),
        "WORKER_ADDRESS": env_str("AGENTFLOW_WORKER_METRICS_ADDRESS", "127.0.0.1"),
    },
}

LOGGING = logging_config(
    format=_log_format,  # type: ignore[arg-type]
    level=env_str("AGENTFLOW_LOG_LEVEL", "INFO"),
    message_text=env_bool("AGENTFLOW_LOG_MESSAGE_TEXT", False),
    task_lines=env_bool("AGENTFLOW_LOG_TASK_LINES", False),
)
