"""AgentFlow's Django settings as one typed, validated object, read when asked (never at import).

``conf()`` reads ``settings.AGENTFLOW`` (a dict) and returns an ``AgentFlowSettings``; it is cheap
(cached until Django's ``setting_changed`` fires), so transports read their limits here instead of
building an agent. The keys are documented in docs/configuration.md.
"""

from __future__ import annotations

import threading
from typing import Any

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
    BACKGROUND_JOBS: bool = True
    CHAT_TOKEN_TTL_SECONDS: int = Field(3600, ge=60)
    WIDGET_ORIGINS: list[str] = Field(default_factory=list)
    DEMO_PAGE: bool = True
    RATE_LIMITS: dict[str, int | float] = Field(default_factory=dict)
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


def conf_reset() -> None:
    """Forget the cached settings (Django's ``setting_changed`` calls this)."""
    global _cached
    with _lock:
        _cached = None
