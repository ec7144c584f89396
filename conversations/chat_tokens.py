"""Chat tokens: signed, expiring tokens that name one end user of one agent for the WebSocket chat.

A token stores nothing server-side: it is the agent's name and the end user's id signed with
``DJANGO_SECRET_KEY`` (a token without an agent, from before agents had names, is the default
agent's), and it
expires after ``AGENTFLOW["CHAT_TOKEN_TTL_SECONDS"]``. The REST route for host backends and the demo
page issue them; the chat consumer reads them.
"""

from __future__ import annotations

from django.core import signing

from agentflow.conf import conf
from agentflow.validation import clean_user_id

CHAT_TOKEN_SALT = "agentflow.chat-token"


def chat_token_create(*, external_id: str, agent: str | None = None) -> str:
    """A chat token for the end user ``external_id`` of ``agent`` (the default agent if None).

    Raises:
        InvalidInput: the user id is empty, too long or has control characters.
    """
    data = {"u": clean_user_id(external_id), "a": agent or conf().DEFAULT_AGENT}
    return signing.dumps(data, salt=CHAT_TOKEN_SALT, compress=True)


def chat_token_read(token: str) -> tuple[str, str] | None:
    """``(agent, end user)`` a chat token was issued for, or None if it is forged or expired."""
    try:
        data = signing.loads(token, salt=CHAT_TOKEN_SALT, max_age=conf().CHAT_TOKEN_TTL_SECONDS)
    except signing.BadSignature:
        return None
    if not isinstance(data, dict):
        return None
    user, agent = data.get("u"), data.get("a", conf().DEFAULT_AGENT)
    if not isinstance(user, str) or not isinstance(agent, str):
        return None
    return agent, user


def chat_token_user(token: str) -> str | None:
    """The end user a chat token was issued for, or None if it is forged or expired."""
    claims = chat_token_read(token)
    return claims[1] if claims else None
