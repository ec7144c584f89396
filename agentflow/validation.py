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


def clean_user_id(user_id: object) -> str:
    if not isinstance(user_id, str):
        raise InvalidInput(f"user_id must be a string; got {type(user_id).__name__}", field="user_id")
    user_id = user_id.strip()
    if not user_id:
        raise InvalidInput("user_id must not be empty", field="user_id")
    if len(user_id) > USER_ID_MAX:
        raise InvalidInput(f"user_id must be at most {USER_ID_MAX} characters", field="user_id")
    if any(unicodedata.category(ch) in ("Cc", "Cf") for ch in user_id):
        raise InvalidInput("user_id must not contain control characters", field="user_id")
    return user_id


def clean_message(message: object, *, max_chars: int) -> str:
    """Normalise a user message; reject empty, oversized or binary-looking input."""
    if not isinstance(message, str):
        raise InvalidInput(f"message must be a string; got {type(message).__name__}", field="message")
    # Keep newlines and tabs; drop other control characters (NUL cannot be stored in PostgreSQL text).
    text = "".join(ch for ch in message if ch in "\n\t" or unicodedata.category(ch) != "Cc").strip()
    if not text:
        raise InvalidInput("message must not be empty", field="message")
    if len(text) > max_chars:
        raise InvalidInput(
            f"message is {len(text)} characters; the limit is {max_chars} (input_config.max_message_chars)",
            field="message",
        )
    return text


def clean_client_message_id(value: object) -> str:
    if value is None or value == "":
        return ""
    if not isinstance(value, str) or not CLIENT_ID_RE.match(value):
        raise InvalidInput(
            "client_message_id must be 1-100 letters, digits or '_.:-' characters", field="client_message_id"
        )
    return value
