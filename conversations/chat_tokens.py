"""Chat tokens: signed, expiring tokens that name one end user for the WebSocket chat.

A token stores nothing server-side: it is the end user's id signed with ``DJANGO_SECRET_KEY``, and it
expires after ``AGENTFLOW["CHAT_TOKEN_TTL_SECONDS"]``. The REST route for host backends and the demo
page issue them; the chat consumer reads them.
"""

from __future__ import annotations

from django.conf import settings
from django.core import signing

from agentflow.validation import clean_user_id

CHAT_TOKEN_SALT = "agentflow.chat-token"


def chat_token_create(*, external_id: str) -> str:
    """A chat token for the end user ``external_id``.

    Raises:
        InvalidInput: the user id is empty, too long or has control characters.
    """
    return signing.dumps({"u": clean_user_id(external_id)}, salt=CHAT_TOKEN_SALT, compress=True)


def chat_token_user(token: str) -> str | None:
    """The end user a chat token was issued for, or None if it is forged or expired."""
    try:
        data = signing.loads(
            token, salt=CHAT_TOKEN_SALT, max_age=settings.AGENTFLOW["CHAT_TOKEN_TTL_SECONDS"]
        )
    except signing.BadSignature:
        return None
    user = data.get("u") if isinstance(data, dict) else None
    return user if isinstance(user, str) else None
