"""Live events to a user's connected chat clients, over the Channels layer (Redis).

Every process can publish (Celery workers after a turn, the admin when staff reply); every
WebSocket connection of a user listens on that user's group.
"""

from __future__ import annotations

import logging
from typing import Any

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer

logger = logging.getLogger("agentflow.events")


def user_group(user_pk: int) -> str:
    return f"chat.user.{user_pk}"


async def apublish(*, user_pk: int, event: dict[str, Any]) -> None:
    """Send ``event`` (it needs a ``kind``) to every live connection of the user."""
    layer = get_channel_layer()
    if layer is None:
        return
    await layer.group_send(user_group(user_pk), {"type": "chat.event", "event": event})


def publish(*, user_pk: int, event: dict[str, Any]) -> None:
    try:
        async_to_sync(apublish)(user_pk=user_pk, event=event)
    except Exception:  # a lost live notification must not fail the turn: clients re-read on reconnect
        logger.exception("could not publish %s to user %s", event.get("kind"), user_pk)
