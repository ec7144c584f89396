"""The framework configuration: one validated, immutable object.

Sources, weakest first (see docs/configuration.md):

1. the defaults below;
2. ``with_config(...)``: a YAML file path, a dict or an ``AgentFrameworkConfig`` (several calls
   deep-merge, later ones winning); ``${VAR}`` / ``${VAR:-default}`` in strings are substituted
   from the environment;
   Secrets in ``tools_config`` (a Slack webhook URL, a Jira token) must be ``${VAR}`` references:
   a literal one is refused (``agentflow.integrations.settings``);
3. ``AGENT_*`` environment variables (``AGENT_NAME``, ``AGENT_SESSION_TTL_SECONDS``,
   ``AGENT_CONFIDENCE_DEFAULT_THRESHOLD``, ``AGENT_LLM_MODEL``...): deployment overrides;
4. explicit builder calls such as ``with_confidence_thresholds``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .integrations.settings import check_integrations, refuse_literal_secrets
from .validation import INTENT_NAME_RE

logger = logging.getLogger("agentflow.config")

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, concise assistant. Answer the user's latest message in the context of the "
    "conversation thread. If you are not sure, say so and offer to bring in a human."
)


def _not_a_bool(value: Any) -> Any:
    # pydantic's lax mode reads true as 1: "messages_per_minute: true" would mean one a minute.
    if isinstance(value, bool):
        raise ValueError("must be a number, not true/false")
    return value


Int = Annotated[int, BeforeValidator(_not_a_bool)]
Float = Annotated[float, BeforeValidator(_not_a_bool)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class SessionConfig(_Section):
    """Per-user sessions and threads."""

    ttl_seconds: Int = Field(
        3600, ge=60, le=30 * 24 * 3600, description="Session lifetime after the last message."
    )
    thread_inactivity_threshold: Float = Field(
        30, gt=0, le=30 * 24 * 60, description="Minutes of silence after which a thread goes dormant."
    )
    threading_profile: Literal["task", "chitchat"] = Field(
        "task", description="Thread scorer weights: task-oriented support (default) or open chit-chat."
    )
    llm_thread_judgement: bool = Field(
        True, description="Ask the LLM where a message belongs when the scorer is unsure (never offline)."
    )
    judgement_margin: Float = Field(
        0.08, ge=0.0, le=0.5, description="How close to a scorer threshold counts as unsure."
    )
    shift_stage: bool = Field(
        True,
        description="Task profile: a second stage reads a message the scorer continued and may open a thread"
        " for a subject of its own (one short embedding of the end of the assistant's last reply).",
    )


class MemoryConfig(_Section):
    """Episodic (per-user) and global memory."""

    enabled: bool = True
    max_episodic_per_user: Int = Field(100, ge=1, le=100_000)
    similarity_threshold: Float = Field(0.6, ge=0.0, le=1.0)
    top_k: Int = Field(5, ge=1, le=50)
    global_patterns: bool = Field(
        False,
        description="Opt in: a resolution also teaches all users a lesson, scrubbed of personal data.",
    )
    review_global: bool = Field(
        True, description="Global memories wait for staff approval in the admin before agents use them."
    )


class ConfidenceConfig(_Section):
    """When the agent answers alone and when a human takes over.

    A threshold is the confidence the agent needs to answer on its own; 0.0 means "always a human".
    """

    default_threshold: Float = Field(0.5, ge=0.0, le=1.0)
    intent_specific: dict[str, Float] = Field(default_factory=dict)
    llm_self_assessment: bool = Field(
        True,
        description="Ask the LLM to rate its reply; a low reply confidence goes to a human (or a question).",
    )
    llm_intent_judgement: bool = Field(
        True,
        description="Ask the LLM for the intent when the classifier is below the threshold (never offline).",
    )

    @field_validator("intent_specific")
    @classmethod
    def _check_thresholds(cls, value: dict[str, float]) -> dict[str, float]:
        for name, threshold in value.items():
            if not INTENT_NAME_RE.match(name):
                raise ValueError(f"{name!r} is not a valid intent name")
            if not 0.0 <= threshold <= 1.0:
                raise ValueError(f"threshold for {name} must be from 0 to 1; got {threshold}")
        return value

    def threshold_for(self, intent: str | None, category_threshold: float | None = None) -> float:
        """The category's own threshold (the admin's), else ``intent_specific``, else the default."""
        if category_threshold is not None:
            return category_threshold
        if intent is not None and intent in self.intent_specific:
            return self.intent_specific[intent]
        return self.default_threshold


class LLMConfig(_Section):
    """The LLM provider and its parameters."""

    provider: Literal["anthropic"] = "anthropic"
    model: str = Field("claude-sonnet-5-5", min_length=1, max_length=100)
    temperature: Float = Field(0.1, ge=0.0, le=1.0)
    max_tokens: Int = Field(1024, ge=1, le=64_000)
    timeout_seconds: Float = Field(60.0, gt=0, le=600)
    max_retries: Int = Field(2, ge=0, le=10)
    max_tool_rounds: Int = Field(5, ge=0, le=20)
    history_messages: Int = Field(20, ge=0, le=200, description="Thread messages sent as context.")
    system_prompt: str = DEFAULT_SYSTEM_PROMPT


class InputConfig(_Section):
    """Checks on incoming messages."""

    max_message_chars: Int = Field(4000, ge=1, le=100_000)


class RateLimitConfig(_Section):
    """Per-user message rate limit: a token bucket (``messages_per_minute`` 0 turns it off).

    A user may send ``burst`` messages at once; the bucket refills at ``messages_per_minute``.
    """

    messages_per_minute: Int = Field(30, ge=0, le=10_000)
    burst: Int = Field(10, ge=1, le=10_000, description="Messages a user may send at once.")


DEFAULT_FALLBACK_REPLY = (
    "Sorry, I can't answer right now: our assistant is temporarily unavailable. "
    "Your message is saved and a member of our team will reply here."
)


class FallbackConfig(_Section):
    """What a turn does when the LLM is down (after the SDK's and the worker's retries).

    With ``enabled``, the user gets ``reply`` (stored as the assistant's reply, ``handled_by``
    ``fallback``) and, with ``escalate``, the thread goes to the human hand-off queue (``escalate``
    also makes an offline-mode reply open the escalation its notice promises). A circuit breaker
    shared through Redis opens after ``breaker_failures`` transient LLM failures within
    ``breaker_window_seconds``: for ``breaker_open_seconds`` turns skip the LLM and get the fallback
    at once; then one trial call decides (a success closes it, a failure opens it again).
    """

    enabled: bool = True
    reply: str = Field(DEFAULT_FALLBACK_REPLY, min_length=1, max_length=4000)
    escalate: bool = True
    breaker_failures: Int = Field(
        5, ge=1, le=1000, description="Transient LLM failures within the window that open the breaker."
    )
    breaker_window_seconds: Int = Field(60, ge=1, le=3600)
    breaker_open_seconds: Int = Field(30, ge=1, le=3600)


class AgentFrameworkConfig(_Section):
    """Everything an agent is configured with. Immutable once built."""

    name: str = Field(
        "agentflow",
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$",
        description="The agent's stable name: letters, digits, _ - . (used in URLs, tokens and the admin).",
    )
    version: str = Field("1.0.0", max_length=50)
    session_config: SessionConfig = Field(default_factory=SessionConfig)
    memory_config: MemoryConfig = Field(default_factory=MemoryConfig)
    confidence_config: ConfidenceConfig = Field(default_factory=ConfidenceConfig)
    llm_config: LLMConfig = Field(default_factory=LLMConfig)
    input_config: InputConfig = Field(default_factory=InputConfig)
    rate_limit_config: RateLimitConfig = Field(default_factory=RateLimitConfig)
    fallback_config: FallbackConfig = Field(default_factory=FallbackConfig)
    tools_config: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Per-integration settings for handlers and tools (free-form)."
    )


# AGENT_<SECTION>_<FIELD> -> (section, field); AGENT_NAME and AGENT_VERSION map to the top level.
_ENV_SECTIONS = {
    "SESSION": "session_config",
    "MEMORY": "memory_config",
    "CONFIDENCE": "confidence_config",
    "LLM": "llm_config",
    "INPUT": "input_config",
    "RATE_LIMIT": "rate_limit_config",
    "FALLBACK": "fallback_config",
}
_ENV_TOP = {"AGENT_NAME": "name", "AGENT_VERSION": "version"}
_SUBST_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _section_fields(section: str) -> dict[str, Any]:
    model = AgentFrameworkConfig.model_fields[section].annotation
    assert isinstance(model, type) and issubclass(model, BaseModel)
    return model.model_fields


def env_overrides(environ: Mapping[str, str]) -> tuple[dict[str, Any], dict[tuple[str, ...], str]]:
    """The AGENT_* variables as a nested dict, and which variable set which path."""
    data: dict[str, Any] = {}
    origin: dict[tuple[str, ...], str] = {}
    for var, raw in sorted(environ.items()):
        if not var.startswith("AGENT_"):
            continue
        if var in _ENV_TOP:
            data[_ENV_TOP[var]] = raw
            origin[(_ENV_TOP[var],)] = var
            continue
        rest = var[len("AGENT_") :]
        for prefix, section in sorted(_ENV_SECTIONS.items(), key=lambda kv: -len(kv[0])):
            if rest.startswith(prefix + "_"):
                field = rest[len(prefix) + 1 :].lower()
                fields = _section_fields(section)
                if field not in fields or field == "intent_specific":
                    known = ", ".join(f"AGENT_{prefix}_{f.upper()}" for f in fields if f != "intent_specific")
                    raise ConfigError(f"{var} is not a known setting; the {section} variables are: {known}")
                data.setdefault(section, {})[field] = raw
                origin[(section, field)] = var
                break
        else:
            logger.warning("ignoring environment variable %s: no AgentFlow setting has that name", var)
    return data, origin


def substitute_env(value: Any, environ: Mapping[str, str], path: str = "") -> Any:
    """Replace ${VAR} and ${VAR:-default} in every string of a nested structure."""
    if isinstance(value, str):

        def repl(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in environ:
                return environ[name]
            if default is not None:
                return default
            logger.warning("config %s references ${%s}, which is not set; using an empty string", path, name)
            return ""

        return _SUBST_RE.sub(repl, value)
    if isinstance(value, Mapping):
        return {k: substitute_env(v, environ, f"{path}.{k}" if path else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, environ, f"{path}[{i}]") for i, v in enumerate(value)]
    return value


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


ConfigSource = str | os.PathLike[str] | Mapping[str, Any] | AgentFrameworkConfig


def source_to_dict(source: ConfigSource, environ: Mapping[str, str]) -> dict[str, Any]:
    """Read one ``with_config`` argument into a plain dict (before validation)."""
    if isinstance(source, AgentFrameworkConfig):
        return source.model_dump(exclude_unset=True)
    if isinstance(source, Mapping):
        refuse_literal_secrets(source, source="a dict passed to with_config")
        return substitute_env(dict(source), environ)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if loaded is None:
            return {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
        refuse_literal_secrets(loaded, source=f"config file {str(path)!r}")
        return substitute_env(dict(loaded), environ)
    raise ConfigError(
        f"with_config takes a YAML path, a dict or an AgentFrameworkConfig; got {type(source).__name__}"
    )


def _leaf_paths(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    paths: list[str] = []
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value and key != "tools_config":
            paths.extend(_leaf_paths(value, path))
        else:
            paths.append(path)
    return paths


def _source_label(source: ConfigSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return f"yaml:{source}"
    if isinstance(source, AgentFrameworkConfig):
        return "config object"
    return "dict"


def resolve_config(
    sources: list[ConfigSource],
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentFrameworkConfig:
    """Merge the sources in precedence order and validate once.

    Raises:
        ConfigError: naming the bad field, and the environment variable when one set it.
    """
    return resolve_config_with_sources(sources, environ=environ, overrides=overrides)[0]


def resolve_config_with_sources(
    sources: list[ConfigSource],
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[AgentFrameworkConfig, dict[str, str]]:
    """``resolve_config``, and where each explicitly set value came from.

    Returns:
        The config, and ``{"llm_config.model": "env:AGENT_LLM_MODEL", ...}`` for every setting a
        source set (``yaml:<path>``, ``dict``, ``config object``, ``env:<VAR>``, ``code``); settings
        absent from the map have their defaults.
    """
    environ = os.environ if environ is None else environ
    data: dict[str, Any] = {}
    where: dict[str, str] = {}
    for source in sources:
        loaded = source_to_dict(source, environ)
        data = deep_merge(data, loaded)
        where.update(dict.fromkeys(_leaf_paths(loaded), _source_label(source)))
    env_data, origin = env_overrides(environ)
    data = deep_merge(data, env_data)
    where.update({".".join(path): f"env:{var}" for path, var in origin.items()})
    if overrides:
        data = deep_merge(data, overrides)
        where.update(dict.fromkeys(_leaf_paths(overrides), "code"))
    try:
        config = AgentFrameworkConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(str(part) for part in error["loc"])
            path = ".".join(loc)
            var = origin.get(loc)
            got = "..." if loc and loc[0] == "tools_config" else error.get("input")  # may hold secrets
            label = f"{var} ({path})" if var else path
            if error["type"] == "extra_forbidden":
                problems.append(f"{label}: unknown setting")
            else:
                problems.append(f"{label}: {error['msg']} (got {got!r})")
        raise ConfigError("invalid AgentFlow configuration: " + "; ".join(problems)) from None
    check_integrations(config.tools_config)
    return config, where
