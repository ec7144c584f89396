"""Input checks (issue 12): lone surrogates, the schema patterns that must say what the checks do,
and configuration numbers that refuse true/false."""

from __future__ import annotations

import re
import sys

import pytest

from agentflow import ConfigError
from agentflow.config import resolve_config
from agentflow.errors import InvalidInput
from agentflow.validation import (
    MESSAGE_PATTERN,
    USER_ID_PATTERN,
    clean_message,
    clean_user_id,
)

# Every code point a URL or JSON can carry as UTF-8 (lone surrogates cannot be; they are tested apart).
CODE_POINTS = [chr(c) for c in range(sys.maxunicode + 1) if not 0xD800 <= c <= 0xDFFF]


def _ecma(pattern: str) -> re.Pattern[str]:
    """A JSON Schema (ECMA-262) pattern in Python: there ``$`` matches only at the very end."""
    return re.compile(pattern[:-1] + r"\Z" if pattern.endswith("$") else pattern)


def _accepted(check, value: str) -> bool:
    try:
        check(value)
    except InvalidInput:
        return False
    return True


@pytest.mark.parametrize("text", ["\ud800", "a\udfffb", "\udbff\udc00"[0] + "x"])
def test_a_lone_surrogate_is_refused_in_messages_and_user_ids(text: str) -> None:
    with pytest.raises(InvalidInput) as message:
        clean_message(text, max_chars=100)
    with pytest.raises(InvalidInput) as user:
        clean_user_id(text)

    assert (
        str(message.value)
        == "message must be valid Unicode text: it holds a lone surrogate (\\ud800-\\udfff)"
    )
    assert str(user.value) == "user_id must be valid Unicode text (UTF-8)"


def test_a_surrogate_pair_decoded_by_json_is_one_real_character() -> None:
    import json

    assert clean_message(json.loads('"\\ud83d\\ude00"'), max_chars=10) == "😀"


@pytest.mark.parametrize("value", ["a/b", "/", "\ufffd", "x\ufffdy"])
def test_user_ids_refuse_slashes_and_replacement_characters(value: str) -> None:
    with pytest.raises(InvalidInput):
        clean_user_id(value)


def test_the_user_id_pattern_says_what_clean_user_id_does_for_every_character() -> None:
    pattern = _ecma(USER_ID_PATTERN)

    disagree = [
        f"U+{ord(ch):04X}"
        for ch in CODE_POINTS
        for value in (ch, f"a{ch}", f"{ch}b")
        if bool(pattern.search(value)) != _accepted(clean_user_id, value)
    ]

    assert disagree == []


@pytest.mark.parametrize("value", ["", " ", "   ", " a ", "a" * 255, "a" * 256, " " + "a" * 255])
def test_the_user_id_schema_and_clean_user_id_agree_on_length_and_spaces(value: str) -> None:
    in_schema = bool(_ecma(USER_ID_PATTERN).search(value)) and 1 <= len(value) <= 255

    assert in_schema == _accepted(clean_user_id, value)


def test_the_message_pattern_says_what_clean_message_does_for_every_character() -> None:
    pattern = _ecma(MESSAGE_PATTERN)

    disagree = [
        f"U+{ord(ch):04X}"
        for ch in CODE_POINTS
        for value in (ch, f" {ch}\n")
        if bool(pattern.search(value)) != _accepted(lambda v: clean_message(v, max_chars=10), value)
    ]

    assert disagree == []


def test_the_message_limit_counts_what_was_sent() -> None:
    with pytest.raises(InvalidInput) as info:
        clean_message("x" * 10 + "\x00", max_chars=10)

    assert str(info.value) == "message is 11 characters; the limit is 10 (input_config.max_message_chars)"
    assert clean_message("x" * 9 + "\x00", max_chars=10) == "x" * 9


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("rate_limit_config", "messages_per_minute"),
        ("input_config", "max_message_chars"),
        ("session_config", "ttl_seconds"),
        ("memory_config", "top_k"),
        ("llm_config", "max_tokens"),
        ("llm_config", "temperature"),
        ("confidence_config", "default_threshold"),
    ],
)
@pytest.mark.parametrize("value", [True, False])
def test_numbers_in_the_configuration_refuse_true_and_false(section: str, field: str, value: bool) -> None:
    with pytest.raises(ConfigError) as info:
        resolve_config([{section: {field: value}}], environ={})

    assert str(info.value) == (
        f"invalid AgentFlow configuration: {section}.{field}: Value error, must be a number, not true/false"
        f" (got {value!r})"
    )


def test_a_threshold_of_true_is_refused_too() -> None:
    with pytest.raises(ConfigError, match="must be a number, not true/false"):
        resolve_config([{"confidence_config": {"intent_specific": {"OUTAGE": True}}}], environ={})


def test_numbers_from_the_environment_and_yaml_still_read() -> None:
    config = resolve_config(
        [{"rate_limit_config": {"messages_per_minute": 5}, "llm_config": {"temperature": 1}}],
        environ={"AGENT_INPUT_MAX_MESSAGE_CHARS": "200"},
    )

    assert config.rate_limit_config.messages_per_minute == 5
    assert config.llm_config.temperature == 1.0
    assert config.input_config.max_message_chars == 200
