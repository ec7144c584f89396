"""Configuration: defaults, YAML with ${VAR} substitution, dicts and objects, AGENT_* variables, errors."""

from __future__ import annotations

import logging
import textwrap

import pytest
from pydantic import ValidationError

from agentflow import (
    AgentFrameworkBuilder,
    AgentFrameworkConfig,
    ConfidenceConfig,
    ConfigError,
    IntentCategory,
    MemoryConfig,
    SessionConfig,
)
from agentflow.config import DEFAULT_SYSTEM_PROMPT, resolve_config

# The seed README's production_config.yaml, verbatim.
PRODUCTION_YAML = """\
# production_config.yaml
name: "my_support_agent"
version: "1.0.0"

session_config:
  ttl_seconds: 3600
  thread_inactivity_threshold: 30

memory_config:
  max_episodic_per_user: 100
  similarity_threshold: 0.6

confidence_config:
  default_threshold: 0.5
  intent_specific:
    OUTAGE: 0.7      # Higher confidence for outages
    ESCALATION: 0.0  # Always escalate

llm_config:
  provider: "anthropic"
  model: "claude-3-sonnet"
  temperature: 0.1

tools_config:
  slack_integration:
    webhook_url: "${SLACK_WEBHOOK_URL}"
  jira_integration:
    server_url: "${JIRA_SERVER_URL}"
    auth_token: "${JIRA_TOKEN}"
"""

TOOL_ENV = {
    "SLACK_WEBHOOK_URL": "https://hooks.slack.com/services/T0/B0/xyz",
    "JIRA_SERVER_URL": "https://jira.example.com",
    "JIRA_TOKEN": "jira-secret",
}

SUPPORT = [
    IntentCategory("QUERY", "General questions", ["How do I...", "What is..."]),
    IntentCategory("OUTAGE", "Production issues", ["Service is down", "Error 500"]),
    IntentCategory("ESCALATION", "Urgent issues", ["Critical", "Production down"]),
]


@pytest.fixture
def production_yaml(tmp_path):
    path = tmp_path / "production_config.yaml"
    path.write_text(PRODUCTION_YAML)
    return path


def write(tmp_path, text: str, name: str = "config.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


# --- defaults and sources --------------------------------------------------------------------


def test_defaults():
    config = resolve_config([], environ={})

    assert config == AgentFrameworkConfig()
    assert (config.name, config.version) == ("agentflow", "1.0.0")
    assert config.session_config.ttl_seconds == 3600
    assert config.session_config.thread_inactivity_threshold == 30
    assert config.memory_config.enabled is True
    assert config.memory_config.max_episodic_per_user == 100
    assert config.memory_config.similarity_threshold == 0.6
    assert config.memory_config.top_k == 5
    assert config.confidence_config.default_threshold == 0.5
    assert config.confidence_config.intent_specific == {}
    assert config.llm_config.provider == "anthropic"
    assert config.llm_config.temperature == 0.1
    assert config.llm_config.max_retries == 2
    assert config.llm_config.system_prompt == DEFAULT_SYSTEM_PROMPT
    assert config.input_config.max_message_chars == 4000
    assert config.rate_limit_config.messages_per_minute == 30
    assert config.tools_config == {}


def test_config_is_immutable():
    config = resolve_config([], environ={})

    with pytest.raises(ValidationError):
        config.name = "changed"
    with pytest.raises(ValidationError):
        config.session_config.ttl_seconds = 10
    assert config.name == "agentflow" and config.session_config.ttl_seconds == 3600


def test_seed_production_yaml_loads_with_substitution(production_yaml):
    config = resolve_config([production_yaml], environ=TOOL_ENV)

    assert config.name == "my_support_agent"
    assert config.session_config.ttl_seconds == 3600
    assert config.memory_config.max_episodic_per_user == 100
    assert config.confidence_config.intent_specific == {"OUTAGE": 0.7, "ESCALATION": 0.0}
    assert config.llm_config.model == "claude-3-sonnet"
    assert config.tools_config == {
        "slack_integration": {"webhook_url": "https://hooks.slack.com/services/T0/B0/xyz"},
        "jira_integration": {"server_url": "https://jira.example.com", "auth_token": "jira-secret"},
    }


def test_yaml_path_as_string_reads_os_environ(production_yaml, monkeypatch):
    for name, value in TOOL_ENV.items():
        monkeypatch.setenv(name, value)

    config = resolve_config([str(production_yaml)])

    assert config.tools_config["jira_integration"]["auth_token"] == "jira-secret"


def test_unset_variable_becomes_empty_string_with_a_warning(production_yaml, caplog):
    environ = {k: v for k, v in TOOL_ENV.items() if k != "JIRA_TOKEN"}

    with caplog.at_level(logging.WARNING, logger="agentflow.config"):
        config = resolve_config([production_yaml], environ=environ)

    assert config.tools_config["jira_integration"]["auth_token"] == ""
    warnings = [r.getMessage() for r in caplog.records if r.name == "agentflow.config"]
    assert len(warnings) == 1
    assert "JIRA_TOKEN" in warnings[0] and "tools_config.jira_integration.auth_token" in warnings[0]


def test_variable_defaults(tmp_path):
    path = write(
        tmp_path,
        """\
        name: "${AGENT_LABEL:-fallback_agent}"
        llm_config:
          model: "${LLM_MODEL:-claude-3-haiku}"
          system_prompt: "You help ${COMPANY:-}customers."
        session_config:
          ttl_seconds: "${TTL:-7200}"
        """,
    )

    unset = resolve_config([path], environ={})
    assert unset.name == "fallback_agent"
    assert unset.llm_config.model == "claude-3-haiku"
    assert unset.llm_config.system_prompt == "You help customers."
    assert unset.session_config.ttl_seconds == 7200

    set_ = resolve_config(
        [path], environ={"AGENT_LABEL": "x", "LLM_MODEL": "claude-opus", "TTL": "900", "COMPANY": "Acme "}
    )
    assert set_.name == "x"
    assert set_.llm_config.model == "claude-opus"
    assert set_.llm_config.system_prompt == "You help Acme customers."
    assert set_.session_config.ttl_seconds == 900


def test_dict_source_is_substituted_too():
    config = resolve_config(
        [{"name": "${BOT}", "tools_config": {"crm": {"url": "${CRM_URL:-http://crm}"}}}],
        environ={"BOT": "crm_bot"},
    )

    assert config.name == "crm_bot"
    assert config.tools_config == {"crm": {"url": "http://crm"}}


def test_config_object_source_as_in_the_seed():
    config = AgentFrameworkConfig(
        name="my_agent",
        session_config=SessionConfig(ttl_seconds=3600),
        memory_config=MemoryConfig(max_episodic_per_user=200),
        confidence_config=ConfidenceConfig(default_threshold=0.6),
    )

    resolved = resolve_config([config], environ={})

    assert resolved == config
    assert resolved.memory_config.max_episodic_per_user == 200
    assert resolved.confidence_config.default_threshold == 0.6


def test_later_sources_deep_merge_over_earlier_ones(production_yaml):
    config = resolve_config(
        [
            production_yaml,
            {
                "session_config": {"ttl_seconds": 600},
                "confidence_config": {"intent_specific": {"QUERY": 0.4}},
            },
            # Only the fields set on an object count: its defaults do not undo earlier sources.
            AgentFrameworkConfig(memory_config=MemoryConfig(top_k=9)),
        ],
        environ=TOOL_ENV,
    )

    assert config.name == "my_support_agent"
    assert config.session_config.ttl_seconds == 600
    assert config.session_config.thread_inactivity_threshold == 30
    assert config.confidence_config.intent_specific == {"OUTAGE": 0.7, "ESCALATION": 0.0, "QUERY": 0.4}
    assert config.memory_config.top_k == 9
    assert config.memory_config.max_episodic_per_user == 100
    assert config.llm_config.model == "claude-3-sonnet"


# --- AGENT_* variables and precedence --------------------------------------------------------

SEED_ENV = {
    "AGENT_NAME": "production_support_agent",
    "AGENT_SESSION_TTL_SECONDS": "7200",
    "AGENT_CONFIDENCE_DEFAULT_THRESHOLD": "0.6",
    "AGENT_LLM_MODEL": "claude-env-model",
}


def test_env_overrides_defaults():
    config = resolve_config([], environ=SEED_ENV)

    assert config.name == "production_support_agent"
    assert config.session_config.ttl_seconds == 7200
    assert config.confidence_config.default_threshold == 0.6
    assert config.llm_config.model == "claude-env-model"


def test_precedence_defaults_config_env_builder(production_yaml):
    config = resolve_config(
        [production_yaml, {"memory_config": {"top_k": 7}}],
        environ={**TOOL_ENV, **SEED_ENV},
        overrides={"confidence_config": {"intent_specific": {"OUTAGE": 0.9}}},
    )

    assert config.name == "production_support_agent"  # env beats YAML
    assert config.session_config.ttl_seconds == 7200  # env beats YAML
    assert config.llm_config.model == "claude-env-model"  # env beats YAML
    assert config.confidence_config.default_threshold == 0.6  # env beats YAML
    assert config.confidence_config.intent_specific == {
        "OUTAGE": 0.9,
        "ESCALATION": 0.0,
    }  # builder beats YAML
    assert config.memory_config.top_k == 7  # with_config beats defaults
    assert config.session_config.thread_inactivity_threshold == 30  # YAML, untouched by env
    assert config.memory_config.similarity_threshold == 0.6  # default


def test_every_section_has_env_variables():
    config = resolve_config(
        [],
        environ={
            "AGENT_VERSION": "2.0.0",
            "AGENT_SESSION_THREAD_INACTIVITY_THRESHOLD": "45.5",
            "AGENT_MEMORY_ENABLED": "false",
            "AGENT_MEMORY_TOP_K": "3",
            "AGENT_LLM_MAX_RETRIES": "0",
            "AGENT_INPUT_MAX_MESSAGE_CHARS": "500",
            "AGENT_RATE_LIMIT_MESSAGES_PER_MINUTE": "0",
        },
    )

    assert config.version == "2.0.0"
    assert config.session_config.thread_inactivity_threshold == 45.5
    assert config.memory_config.enabled is False
    assert config.memory_config.top_k == 3
    assert config.llm_config.max_retries == 0
    assert config.input_config.max_message_chars == 500
    assert config.rate_limit_config.messages_per_minute == 0


def test_unrelated_agent_variable_is_ignored_with_a_warning(caplog):
    with caplog.at_level(logging.WARNING, logger="agentflow.config"):
        config = resolve_config([], environ={"AGENT_HOME": "/opt/agent"})

    assert config == AgentFrameworkConfig()
    assert any("AGENT_HOME" in r.getMessage() for r in caplog.records)


@pytest.mark.django_db
def test_builder_precedence_end_to_end(production_yaml, monkeypatch):
    for name, value in {**TOOL_ENV, **SEED_ENV}.items():
        monkeypatch.setenv(name, value)

    agent = (
        AgentFrameworkBuilder()
        .with_intent_categories(SUPPORT)
        .with_config(production_yaml)
        .with_config({"session_config": {"thread_inactivity_threshold": 15}})
        .with_confidence_thresholds({"OUTAGE": 0.8})
        .build_sync(None)
    )

    config = agent.config
    assert config.name == "production_support_agent"
    assert config.session_config.ttl_seconds == 7200
    assert config.session_config.thread_inactivity_threshold == 15
    assert config.confidence_config.default_threshold == 0.6
    assert config.confidence_config.intent_specific == {"OUTAGE": 0.8, "ESCALATION": 0.0}
    assert config.llm_config.model == "claude-env-model"
    assert config.tools_config["slack_integration"]["webhook_url"] == TOOL_ENV["SLACK_WEBHOOK_URL"]


@pytest.mark.django_db
def test_builder_takes_a_config_object():
    config = AgentFrameworkConfig(name="my_agent", confidence_config=ConfidenceConfig(default_threshold=0.6))

    agent = AgentFrameworkBuilder().with_intent_categories(SUPPORT).with_config(config).build_sync(None)

    assert agent.config.name == "my_agent"
    assert agent.config.confidence_config.default_threshold == 0.6


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", "-5", "59", "1.5"])
def test_bad_env_value_names_the_variable_and_the_field(value):
    with pytest.raises(ConfigError) as info:
        resolve_config([], environ={"AGENT_SESSION_TTL_SECONDS": value})

    message = str(info.value)
    assert "AGENT_SESSION_TTL_SECONDS" in message
    assert "session_config.ttl_seconds" in message
    assert repr(value) in message


def test_bad_threshold_env_names_the_variable():
    with pytest.raises(ConfigError) as info:
        resolve_config([], environ={"AGENT_CONFIDENCE_DEFAULT_THRESHOLD": "1.5"})

    assert "AGENT_CONFIDENCE_DEFAULT_THRESHOLD (confidence_config.default_threshold)" in str(info.value)


def test_bad_provider_env_names_the_variable():
    with pytest.raises(ConfigError, match=r"AGENT_LLM_PROVIDER \(llm_config.provider\)"):
        resolve_config([], environ={"AGENT_LLM_PROVIDER": "openai"})


def test_unknown_section_variable_lists_the_known_ones():
    with pytest.raises(ConfigError) as info:
        resolve_config([], environ={"AGENT_SESSION_FOO": "1"})

    message = str(info.value)
    assert message.startswith("AGENT_SESSION_FOO is not a known setting")
    assert "AGENT_SESSION_TTL_SECONDS" in message and "AGENT_SESSION_THREAD_INACTIVITY_THRESHOLD" in message


def test_intent_specific_cannot_come_from_a_variable():
    with pytest.raises(ConfigError, match="AGENT_CONFIDENCE_INTENT_SPECIFIC is not a known setting"):
        resolve_config([], environ={"AGENT_CONFIDENCE_INTENT_SPECIFIC": "{}"})


def test_errors_from_yaml_name_the_field_but_no_variable(tmp_path):
    path = write(
        tmp_path,
        """\
        session_config:
          ttl_seconds: 10
        """,
    )

    with pytest.raises(ConfigError) as info:
        resolve_config([path], environ={})

    message = str(info.value)
    assert "session_config.ttl_seconds: " in message and "AGENT_" not in message


def test_several_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as info:
        resolve_config([{"memory_config": {"top_k": 0}}], environ={"AGENT_LLM_TEMPERATURE": "hot"})

    message = str(info.value)
    assert "memory_config.top_k" in message
    assert "AGENT_LLM_TEMPERATURE (llm_config.temperature)" in message


def test_unknown_top_level_key_in_yaml(tmp_path):
    path = write(
        tmp_path,
        """\
        name: bot
        sesion_config:
          ttl_seconds: 3600
        """,
    )

    with pytest.raises(ConfigError, match=r"sesion_config: unknown setting"):
        resolve_config([path], environ={})


def test_unknown_nested_key_in_yaml(tmp_path):
    path = write(
        tmp_path,
        """\
        memory_config:
          max_memories: 5
        """,
    )

    with pytest.raises(ConfigError, match=r"memory_config.max_memories: unknown setting"):
        resolve_config([path], environ={})


def test_invalid_yaml(tmp_path):
    path = write(tmp_path, "name: [unclosed\n")

    with pytest.raises(ConfigError) as info:
        resolve_config([path], environ={})

    assert "is not valid YAML" in str(info.value) and str(path) in str(info.value)


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.yaml"

    with pytest.raises(ConfigError, match="does not exist") as info:
        resolve_config([missing], environ={})

    assert str(missing) in str(info.value)


def test_yaml_that_is_a_list(tmp_path):
    path = write(tmp_path, "- name: bot\n- version: 2\n")

    with pytest.raises(ConfigError, match="must hold a mapping at the top level"):
        resolve_config([path], environ={})


def test_empty_yaml_means_defaults(tmp_path):
    path = write(tmp_path, "# nothing configured yet\n")

    assert resolve_config([path], environ={}) == AgentFrameworkConfig()


def test_unsupported_source_type():
    with pytest.raises(ConfigError, match="got int"):
        resolve_config([42], environ={})


@pytest.mark.parametrize("threshold", [1.5, -0.1])
def test_intent_threshold_out_of_range(threshold):
    with pytest.raises(ConfigError) as info:
        resolve_config([{"confidence_config": {"intent_specific": {"OUTAGE": threshold}}}], environ={})

    message = str(info.value)
    assert "confidence_config.intent_specific" in message and "OUTAGE" in message


def test_bad_intent_name_in_thresholds():
    with pytest.raises(ConfigError) as info:
        resolve_config([{"confidence_config": {"intent_specific": {"bad name!": 0.5}}}], environ={})

    assert "'bad name!' is not a valid intent name" in str(info.value)


@pytest.mark.django_db
def test_builder_reports_env_errors(monkeypatch):
    monkeypatch.setenv("AGENT_SESSION_TTL_SECONDS", "abc")

    with pytest.raises(ConfigError, match="AGENT_SESSION_TTL_SECONDS"):
        AgentFrameworkBuilder().with_intent_categories(SUPPORT).build_sync(None)


@pytest.mark.django_db
def test_builder_reports_yaml_errors(tmp_path):
    path = write(tmp_path, "llm_config:\n  temperature: 3\n")

    with pytest.raises(ConfigError, match=r"llm_config.temperature"):
        AgentFrameworkBuilder().with_intent_categories(SUPPORT).with_config(path).build_sync(None)
