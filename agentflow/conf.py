"""AgentFlow's Django settings as one typed, validated object, read when asked (never at import).

``conf()`` reads ``settings.AGENTFLOW`` (a dict) and returns an ``AgentFlowSettings``; it is cheap
(cached until Django's ``setting_changed`` fires), so transports read their limits here instead of
building an agent. The keys are documented in docs/configuration.md.
"""

from __future__ import annotations

import threading
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError


class HealthSettings(BaseModel):
    """``AGENTFLOW["HEALTH"]``: the readiness probe and the worker heartbeat (docs/operations.md, "Health")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    CHECK_TIMEOUT_SECONDS: float = Field(2.0, gt=0, le=30)
    WORKER_HEARTBEAT_SECONDS: float = Field(10.0, gt=0, le=300)
    WORKER_MAX_AGE_SECONDS: float = Field(30.0, gt=0, le=3600)
    RETRY_AFTER_SECONDS: int = Field(5, ge=1, le=3600)


class ModelPrice(BaseModel):
    """What a model costs, in US dollars per million input and output tokens (the dashboard's cost)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input: float = Field(ge=0)
    output: float = Field(ge=0)


# List prices (USD per million tokens) of the models the configuration names; AGENTFLOW["MODEL_PRICES"]
# (or AGENTFLOW_MODEL_PRICES) adds models or overrides these. Check them against your own contract.
DEFAULT_MODEL_PRICES: dict[str, ModelPrice] = {
    "claude-opus-5-5": ModelPrice(input=5.0, output=25.0),
    "claude-sonnet-5-5": ModelPrice(input=3.0, output=15.0),
    "claude-haiku-5-5": ModelPrice(input=1.0, output=5.0),
}


class LogSettings(BaseModel):
    """``AGENTFLOW["LOGS"]``: structured logs (docs/operations.md, "Logs")."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    FORMAT: Literal["text", "json"] = "text"
    MESSAGE_TEXT: bool = False  # put users' messages and replies in the turn log line


class MetricsSettings(BaseModel):
    """``AGENTFLOW["METRICS"]``: who may read ``/metrics``, and the worker's own port (docs/operations.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ENABLED: bool = True
    # Clients allowed without a token: addresses or networks (CIDR). Loopback by default.
    ALLOWED_IPS: list[str] = Field(default_factory=lambda: ["127.0.0.1/32", "::1/128"])
    # A bearer token that allows any client (``Authorization: Bearer <token>``); empty: none.
    TOKEN: str = ""
    STAFF: bool = True  # logged-in staff may read /metrics from the browser
    QUEUE: bool = True  # compute the queue's depth and age at scrape time (one SQL aggregate)
    # The worker serves its metrics on this port (0: it does not); on WORKER_ADDRESS.
    WORKER_PORT: int = Field(0, ge=0, le=65535)
    WORKER_ADDRESS: str = "127.0.0.1"


# ``AGENTFLOW["RATE_LIMITS"]``'s defaults: a project sets only the keys it changes (docs/configuration.md).
DEFAULT_RATE_LIMITS: dict[str, int | float] = {
    "API_KEY_PER_MINUTE": 600,
    "API_KEY_BURST": 100,
    "IP_PER_MINUTE": 600,
    "IP_BURST": 100,
    "AUTH_FAILURES_PER_MINUTE": 5,
    "AUTH_FAILURES_BURST": 10,
    "WS_FRAMES_PER_SECOND": 5,
    "WS_FRAME_BURST": 20,
    "WS_FRAME_OVERFLOW_CLOSE": 20,
    "WS_CONNECTIONS_PER_USER": 10,
}


class AgentFlowSettings(BaseModel):
    """``settings.AGENTFLOW``, validated. Keys are upper-case, as in Django settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    DEFAULT_AGENT: str = Field("agentflow", min_length=1, max_length=100)
    AGENTS: dict[str, str] = Field(
        default_factory=dict,
        description="Agent name -> dotted path of a callable returning a builder or agent.",
    )
    CONFIG: str | dict[str, Any] | None = None
    AGENT_FACTORY: str = "agentflow.registry.build_default_agent"
    EMBEDDER: str = "agentflow.embeddings.MiniLMEmbedder"
    REST_WAIT_SECONDS: int = Field(30, ge=0, le=120)
    # On SIGTERM under daphne, how long the web process drains before it stops (agentflow.drain).
    WEB_DRAIN_SECONDS: int = Field(5, ge=0, le=600)
    # A streamed reply's text goes to the user's connections at most this often (ms); 0: every chunk.
    STREAM_INTERVAL_MS: int = Field(50, ge=0, le=2000)
    BACKGROUND_JOBS: bool = True
    CHAT_TOKEN_TTL_SECONDS: int = Field(3600, ge=60)
    WIDGET_ORIGINS: list[str] = Field(default_factory=list)
    DEMO_PAGE: bool = False
    RATE_LIMITS: dict[str, int | float] = Field(default_factory=lambda: dict(DEFAULT_RATE_LIMITS))
    HEALTH: HealthSettings = Field(default_factory=HealthSettings)
    MODEL_PRICES: dict[str, ModelPrice] = Field(
        default_factory=lambda: dict(DEFAULT_MODEL_PRICES),
        description="Model -> price per million tokens; merged over DEFAULT_MODEL_PRICES.",
    )

    @field_validator("MODEL_PRICES", mode="before")
    @classmethod
    def _prices(cls, value: Any) -> Any:
        """Merge over the defaults; a price may be ``{"input": 3, "output": 15}`` or ``"3:15"``."""
        if not isinstance(value, dict):
            return value
        merged: dict[str, Any] = dict(DEFAULT_MODEL_PRICES)
        for model, price in value.items():
            if isinstance(price, str):
                inputs, sep, outputs = price.partition(":")
                try:
                    price = {"input": float(inputs), "output": float(outputs)} if sep else price
                except ValueError:
                    raise ValueError(
                        f"price of {model!r} must be INPUT:OUTPUT dollars; got {price!r}"
                    ) from None
            merged[model] = price
        return merged

    LOGS: LogSettings = Field(default_factory=LogSettings)
    METRICS: MetricsSettings = Field(default_factory=MetricsSettings)

    @field_validator("RATE_LIMITS")
    @classmethod
    def _rate_limit_defaults(cls, value: dict[str, int | float]) -> dict[str, int | float]:
        unknown = sorted(set(value) - set(DEFAULT_RATE_LIMITS))
        if unknown:
            raise ValueError(f"unknown rate limit(s) {unknown}; known: {sorted(DEFAULT_RATE_LIMITS)}")
        return {**DEFAULT_RATE_LIMITS, **value}

    def agent_paths(self) -> dict[str, str]:
        """Every declared agent: ``AGENTS``, plus the default agent from ``AGENT_FACTORY`` unless declared."""
        return {self.DEFAULT_AGENT: self.AGENT_FACTORY, **self.AGENTS}


_lock = threading.Lock()
_cached: AgentFlowSettings | None = None


def conf() -> AgentFlowSettings:
    """The validated ``settings.AGENTFLOW``.

    Raises:
        ConfigError: a key is unknown or has a bad value.
    """
    global _cached
    with _lock:
        if _cached is None:
            from django.conf import settings

            raw: dict[str, Any] = dict(getattr(settings, "AGENTFLOW", {}) or {})
            try:
                _cached = AgentFlowSettings.model_validate(raw)
            except ValidationError as exc:
                problems = "; ".join(f"AGENTFLOW[{e['loc'][0]!r}]: {e['msg']}" for e in exc.errors())
                raise ConfigError(f"invalid AGENTFLOW settings: {problems}") from None
        return _cached


# Connections one Redis client (its pool) of a process may open. redis-py 8 lowered its default to 100;
# a web process has one blocking pop open per waiting REST request and one pool shared by every
# request thread, so past 100 of those at once calls failed with "Too many connections" (503s and
# 202s at 500 concurrent REST users, bench/production_load.py). This is Redis's own default
# ``maxclients``: connections are opened only as needed, so it is a ceiling, not a reservation.
REDIS_MAX_CONNECTIONS = 10_000


def redis_url() -> str:
    """``settings.REDIS_URL``: the Redis of the rate limits, the health checks and the worker heartbeat.

    A host project that sets none gets ``redis://127.0.0.1:6379/0`` (docs/host-project.md).
    """
    from django.conf import settings

    return str(getattr(settings, "REDIS_URL", "") or "redis://127.0.0.1:6379/0")


def anthropic_api_key() -> str:
    """``settings.ANTHROPIC_API_KEY``, or "" (offline mode) when the project sets none."""
    from django.conf import settings

    return str(getattr(settings, "ANTHROPIC_API_KEY", "") or "")


def anthropic_base_url() -> str:
    """``settings.ANTHROPIC_BASE_URL``, or "" (the SDK's default endpoint)."""
    from django.conf import settings

    return str(getattr(settings, "ANTHROPIC_BASE_URL", "") or "")


def conf_reset() -> None:
    """Forget the cached settings (Django's ``setting_changed`` calls this)."""
    global _cached
    with _lock:
        _cached = None
