"""Chat tokens: signed, expiring tokens that name one end user of one agent for the WebSocket chat.

A token stores nothing server-side: it is the agent's name and the end user's id signed with
``DJANGO_SECRET_KEY`` (a token without an agent, from before agents had names, is the default
agent's), with the time it was issued, and it expires after ``AGENTFLOW["CHAT_TOKEN_TTL_SECONDS"]``. The REST route for host backends and the demo
page issue them; the chat consumer reads them.

Erasing a user revokes their tokens (``chat_token_revoke``): the time of the erase is kept in Redis
for longer than a token lives, and a token issued before it is refused (``chat_token_check``).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from django.core import signing
from django.core.cache import cache

from agentflow.conf import conf
from agentflow.validation import clean_user_id

CHAT_TOKEN_SALT = "agentflow.chat-token"


def chat_token_create(*, external_id: str, agent: str | None = None) -> str:
    """A chat token for the end user ``external_id`` of ``agent`` (the default agent if None).

    Raises:
        InvalidInput: the user id is empty, too long or has control characters.
    """
    payload = {
        "u": clean_user_id(external_id),
        "a": agent or conf().DEFAULT_AGENT,
        "t": round(time.time(), 6),
    }
    return signing.dumps(payload, salt=CHAT_TOKEN_SALT, compress=True)


@dataclass(frozen=True)
class ChatTokenClaims:
    """What a valid chat token says: the agent, the end user, and when it was issued (Unix time)."""

    agent: str
    external_id: str
    issued_at: float


def chat_token_claims(token: str) -> ChatTokenClaims | None:
    """The claims of a chat token, or None if it is forged or expired (revocation is not checked)."""
    try:
        data = signing.loads(token, salt=CHAT_TOKEN_SALT, max_age=conf().CHAT_TOKEN_TTL_SECONDS)
    except signing.BadSignature:
        return None
    if not isinstance(data, dict):
        return None
    user, agent, issued = data.get("u"), data.get("a", conf().DEFAULT_AGENT), data.get("t", 0.0)
    if not isinstance(user, str) or not isinstance(agent, str) or not isinstance(issued, (int, float)):
        return None
    return ChatTokenClaims(agent=agent, external_id=user, issued_at=float(issued))


def chat_token_user(token: str) -> str | None:
    """The end user a chat token was issued for, or None if it is forged, expired or revoked."""
    claims = chat_token_claims(token)
    if claims is None or chat_token_revoked(claims=claims):
        return None
    return claims.external_id


def _revocation_key(external_id: str) -> str:
    return f"chat-revoked:{hashlib.sha256(external_id.encode()).hexdigest()[:32]}"


def chat_token_revoke(*, external_id: str) -> None:
    """Refuse every chat token of this person issued until now, whatever its agent (their erase).

    Kept for the token lifetime plus a minute: by then every earlier token has expired anyway.
    """
    cache.set(_revocation_key(external_id), time.time(), timeout=conf().CHAT_TOKEN_TTL_SECONDS + 60)


def chat_token_revoked(*, claims: ChatTokenClaims) -> bool:
    """Whether the token was issued before its user's tokens were revoked."""
    revoked_at = cache.get(_revocation_key(claims.external_id))
    return revoked_at is not None and claims.issued_at <= float(revoked_at)
