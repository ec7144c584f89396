"""Input checks shared by the public API, the REST API, the WebSocket and the admin."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import ConfigError, InvalidInput

INTENT_NAME_RE = re.compile(r"^[A-Za-z0-9_][^\s]{0,99}$")  # e.g. OUTAGE, card.lost, reverted_card_payment?
USER_ID_MAX = 255
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9_.:\-]{1,100}$")
# Characters a user id may not hold (besides lone surrogates): control (Cc) and format (Cf)
# characters as of Unicode 14 (Python 3.11), "/" and U+FFFD. USER_ID_PATTERN says the same for the
# OpenAPI schema; tests/agentflow/test_validation_inputs.py checks the two agree on every code point.
_USER_ID_FORBIDDEN = (
    (0x00, 0x1F), (0x2F, 0x2F), (0x7F, 0x9F), (0xAD, 0xAD), (0x600, 0x605), (0x61C, 0x61C),
    (0x6DD, 0x6DD), (0x70F, 0x70F), (0x890, 0x891), (0x8E2, 0x8E2), (0x180E, 0x180E),
    (0x200B, 0x200F), (0x202A, 0x202E), (0x2060, 0x2064), (0x2066, 0x206F), (0xFEFF, 0xFEFF),
    (0xFFF9, 0xFFFB), (0xFFFD, 0xFFFD), (0x110BD, 0x110BD), (0x110CD, 0x110CD), (0x13430, 0x13438),
    (0x1BCA0, 0x1BCA3), (0x1D173, 0x1D17A), (0xE0001, 0xE0001), (0xE0020, 0xE007F),
)  # fmt: skip
# What str.strip() removes that is not forbidden above.
_USER_ID_SPACES = ((0x20, 0x20), (0xA0, 0xA0), (0x1680, 0x1680), (0x2000, 0x200A), (0x2028, 0x2029),
                   (0x202F, 0x202F), (0x205F, 0x205F), (0x3000, 0x3000))  # fmt: skip


def _char(code: int) -> str:
    # \uXXXX reads the same in Python, ECMA-262 and Rust regexes; astral characters stay literal.
    return f"\\u{code:04x}" if code <= 0xFFFF else chr(code)


def _ranges(ranges: tuple[tuple[int, int], ...]) -> str:
    return "".join(_char(a) if a == b else f"{_char(a)}-{_char(b)}" for a, b in ranges)


# 1-255 characters, none forbidden, not all whitespace (the schema adds maxLength 255).
USER_ID_PATTERN = (
    f"^[^{_ranges(_USER_ID_FORBIDDEN)}]*"
    f"[^{_ranges(_USER_ID_FORBIDDEN + _USER_ID_SPACES)}]"
    f"[^{_ranges(_USER_ID_FORBIDDEN)}]*$"
)
# A message keeps something once control characters are dropped and whitespace is trimmed: it holds a
# character that is neither (an unanchored JSON Schema pattern). Checked like USER_ID_PATTERN.
MESSAGE_PATTERN = f"[^{_ranges(((0x00, 0x20), (0x7F, 0xA0), *_USER_ID_SPACES[2:]))}]"


@dataclass(frozen=True)
class CleanIntent:
    name: str
    description: str
    examples: tuple[str, ...]
    threshold: float | None


def validate_intent_fields(
    name: object, description: object, examples: object, threshold: object
) -> CleanIntent:
    """Check an intent category's fields; raise ConfigError naming the bad one."""
    if not isinstance(name, str) or not INTENT_NAME_RE.match(name):
        raise ConfigError(
            f"intent name must be 1-100 characters without spaces, starting with a letter, digit or '_';"
            f" got {name!r}"
        )
    if not isinstance(description, str):
        raise ConfigError(f"intent {name}: description must be a string; got {type(description).__name__}")
    if isinstance(examples, str) or not isinstance(examples, Sequence):
        raise ConfigError(f"intent {name}: examples must be a list of strings; got {type(examples).__name__}")
    cleaned: list[str] = []
    for example in examples:
        if not isinstance(example, str) or not example.strip():
            raise ConfigError(f"intent {name}: every example must be a non-empty string; got {example!r}")
        cleaned.append(example.strip())
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
            raise ConfigError(f"intent {name}: threshold must be a number from 0 to 1; got {threshold!r}")
        if not 0.0 <= float(threshold) <= 1.0:
            raise ConfigError(f"intent {name}: threshold must be from 0 to 1; got {threshold}")
        threshold = float(threshold)
    return CleanIntent(name, description.strip(), tuple(cleaned), threshold)


def has_lone_surrogate(text: str) -> bool:
    """Whether ``text`` holds a lone UTF-16 surrogate (``"\\ud800"`` in JSON): not Unicode text.

    Python's JSON decoder lets them through; PostgreSQL, UTF-8 and the LLM cannot take them.
    """
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def clean_user_id(user_id: object) -> str:
    """The stripped user id; raise InvalidInput (field ``user_id``) when it cannot be one.

    A user id is 1-255 characters without control or format characters, lone surrogates, U+FFFD
    (the mark of bytes that were not UTF-8, e.g. ``%FF`` in a URL) or ``/`` (a REST path could not
    address it).
    """
    if not isinstance(user_id, str):
        raise InvalidInput(f"user_id must be a string; got {type(user_id).__name__}", field="user_id")
    # Checked as sent, before trimming, so that the schema's pattern and maxLength say the same.
    if len(user_id) > USER_ID_MAX:
        raise InvalidInput(f"user_id must be at most {USER_ID_MAX} characters", field="user_id")
    if has_lone_surrogate(user_id) or "\ufffd" in user_id:
        raise InvalidInput("user_id must be valid Unicode text (UTF-8)", field="user_id")
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in user_id):
        raise InvalidInput("user_id must not contain control characters", field="user_id")
    if "/" in user_id:
        raise InvalidInput("user_id must not contain '/'", field="user_id")
    user_id = user_id.strip()
    if not user_id:
        raise InvalidInput("user_id must not be empty", field="user_id")
    return user_id


def clean_message(message: object, *, max_chars: int) -> str:
    """Normalise a user message; reject empty, oversized or binary-looking input."""
    if not isinstance(message, str):
        raise InvalidInput(f"message must be a string; got {type(message).__name__}", field="message")
    if has_lone_surrogate(message):
        raise InvalidInput(
            "message must be valid Unicode text: it holds a lone surrogate (\\ud800-\\udfff)", field="message"
        )
    # The limit counts what was sent, so that it matches the API schema's maxLength.
    if len(message) > max_chars:
        raise InvalidInput(
            f"message is {len(message)} characters; the limit is {max_chars} (input_config.max_message_chars)",
            field="message",
        )
    # Keep newlines and tabs; drop other control characters (NUL cannot be stored in PostgreSQL text).
    text = "".join(ch for ch in message if ch in "\n\t" or unicodedata.category(ch) != "Cc").strip()
    if not text:
        raise InvalidInput("message must not be empty", field="message")
    return text


def clean_client_message_id(value: object) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not CLIENT_ID_RE.match(value):
        raise InvalidInput(
            "client_message_id must be 1-100 letters, digits or '_.:-' characters", field="client_message_id"
        )
    return value
