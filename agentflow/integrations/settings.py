"""The typed settings of the seed's integrations, read from ``tools_config``.

``tools_config`` stays a free-form mapping (handlers and tools may keep their own sections there);
the two sections AgentFlow itself acts on are checked when the configuration is resolved:

- ``slack_integration``: post to an incoming webhook when a thread is handed to a human (and,
  optionally, when a turn fails);
- ``jira_integration``: a ``create_ticket`` tool for the LLM and a "Create Jira issue" admin action.

Secrets (``slack_integration.webhook_url``, ``jira_integration.auth_token``) are accepted only as
``${VAR}`` references in YAML and dict sources (``refuse_literal_secrets``), so they live in the
environment (a Kubernetes ``Secret``, a ``.env`` file) and never in a file under version control.
An empty secret (the variable is unset) turns its integration off, with a warning.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ..errors import ConfigError

logger = logging.getLogger("agentflow.integrations")

SLACK = "slack_integration"
JIRA = "jira_integration"
# (section, field): values that must come from the environment.
SECRET_FIELDS = ((SLACK, "webhook_url"), (JIRA, "auth_token"))
_REFERENCE_RE = re.compile(r"^\$\{[A-Za-z_][A-Za-z0-9_]*(?::-)?\}$")
_VAR_EXAMPLE = {(SLACK, "webhook_url"): "SLACK_WEBHOOK_URL", (JIRA, "auth_token"): "JIRA_TOKEN"}


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("must be an http(s) URL such as https://host/path")
    return value.rstrip("/")


class _Integration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_seconds: float = Field(5.0, gt=0, le=60, description="Per HTTP request.")
    max_retries: int = Field(
        3, ge=0, le=10, description="Retries of a transient failure (connection, 429, 5xx)."
    )
    retry_backoff_seconds: float = Field(
        1.0, gt=0, le=60, description="The first retry's delay; doubled each time (Retry-After wins)."
    )


class SlackSettings(_Integration):
    """``tools_config.slack_integration``."""

    webhook_url: str = Field(description="The incoming webhook (a secret: ${SLACK_WEBHOOK_URL}).")
    notify_on: tuple[Literal["escalation", "failure"], ...] = ("escalation",)
    excerpt: Literal["scrubbed", "full", "none"] = Field(
        "scrubbed", description="How much of the user's message the post shows."
    )
    excerpt_chars: int = Field(300, ge=20, le=2000)
    channel: str = Field(
        "",
        max_length=80,
        description="A channel override (legacy webhooks only; app webhooks post to theirs).",
    )
    admin_base_url: str = Field(
        "", description="The admin's public base URL (https://ops.example.com): posts link to the escalation."
    )

    @field_validator("webhook_url")
    @classmethod
    def _webhook(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("admin_base_url")
    @classmethod
    def _base(cls, value: str) -> str:
        return _http_url(value) if value else ""


class JiraSettings(_Integration):
    """``tools_config.jira_integration``."""

    server_url: str
    auth_token: str = Field(description="An API token or personal access token (a secret: ${JIRA_TOKEN}).")
    auth: Literal["bearer", "basic"] = Field(
        "bearer", description="bearer (Jira Data Center PAT) or basic (Jira Cloud: email + API token)."
    )
    email: str = Field("", description="The account's email, for basic auth.")
    project_key: str = Field("", description="The project new issues go to, e.g. SUP.")
    issue_type: str = Field("Task", min_length=1, max_length=60)
    llm_tool: bool = Field(True, description="Offer the LLM the create_ticket tool.")
    max_retries: int = Field(2, ge=0, le=10)
    retry_backoff_seconds: float = Field(0.5, gt=0, le=30)
    timeout_seconds: float = Field(10.0, gt=0, le=60)

    @field_validator("server_url")
    @classmethod
    def _server(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("project_key")
    @classmethod
    def _project(cls, value: str) -> str:
        if value and not re.fullmatch(r"[A-Z][A-Z0-9_]{0,49}", value):
            raise ValueError("must be a Jira project key: capital letters, digits and _, e.g. SUP")
        return value


def refuse_literal_secrets(raw: Mapping[str, Any], *, source: str) -> None:
    """Refuse a secret written into a YAML file or dict: it must be a ``${VAR}`` reference.

    Checked on the source as written, before ``${VAR}`` substitution. An empty value is allowed
    (the integration is off).

    Raises:
        ConfigError: naming the field and how to fix it (the value itself is never shown).
    """
    tools = raw.get("tools_config")
    if not isinstance(tools, Mapping):
        return
    for section, name in SECRET_FIELDS:
        block = tools.get(section)
        if not isinstance(block, Mapping) or name not in block:
            continue
        value = block[name]
        if value in ("", None) or (isinstance(value, str) and _REFERENCE_RE.match(value)):
            continue
        var = _VAR_EXAMPLE[(section, name)]
        raise ConfigError(
            f"tools_config.{section}.{name} in {source} holds a literal secret: secrets come only from the "
            f'environment. Write {name}: "${{{var}}}" and set {var} in the environment (or a .env file)'
        )


def _section(tools_config: Mapping[str, Any], section: str, model: type[_Integration]) -> Any:
    block = tools_config.get(section)
    if block is None:
        return None
    if not isinstance(block, Mapping):
        raise ConfigError(f"tools_config.{section} must be a mapping of settings")
    secret = next(f for s, f in SECRET_FIELDS if s == section)
    required = ("webhook_url",) if section == SLACK else ("server_url", "auth_token")
    empty = [name for name in required if not block.get(name)]
    if empty:
        logger.warning(
            "tools_config.%s is off: %s %s empty (is the environment variable set?)",
            section,
            " and ".join(empty),
            "is" if len(empty) == 1 else "are",
        )
        return None
    try:
        return model.model_validate(dict(block))
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            path = ".".join(str(p) for p in error["loc"])
            shown = "" if path == secret else f" (got {error.get('input')!r})"
            problems.append(f"tools_config.{section}.{path}: {error['msg']}{shown}")
        raise ConfigError("invalid AgentFlow configuration: " + "; ".join(problems)) from None


def slack_settings(tools_config: Mapping[str, Any]) -> SlackSettings | None:
    """The Slack integration's settings, or None when it is not configured (or its URL is empty)."""
    settings: SlackSettings | None = _section(tools_config, SLACK, SlackSettings)
    return settings


def jira_settings(tools_config: Mapping[str, Any]) -> JiraSettings | None:
    """The Jira integration's settings, or None when it is not configured (or a field is empty)."""
    settings: JiraSettings | None = _section(tools_config, JIRA, JiraSettings)
    return settings


def check_integrations(tools_config: Mapping[str, Any]) -> None:
    """Validate the integration sections of ``tools_config`` (called when a configuration resolves).

    Raises:
        ConfigError: a bad URL, an unknown setting, a bad project key... naming the field.
    """
    slack_settings(tools_config)
    jira = jira_settings(tools_config)
    if jira is not None and jira.auth == "basic" and not jira.email:
        raise ConfigError("tools_config.jira_integration.email is required with auth: basic")
    if jira is not None and not jira.project_key:
        logger.warning(
            "tools_config.jira_integration has no project_key: the create_ticket tool and the admin's "
            "'Create Jira issue' action are off"
        )
