"""Chat with an AgentFlow agent over the WebSocket: send one message, print the bot's reply.

    .venv/bin/python examples/ws_client.py TOKEN ["My login is broken"] [--url http://127.0.0.1:8000]

TOKEN is an end user's chat token (``POST /api/users/{user_id}/chat-token`` with an API key; see the
README's tour). The script connects to ``/ws/chat/``, sends the message and prints the reply as it
streams in (``delta`` frames), then the final ``turn`` frame: the whole reply and its thread, intent,
confidence and hand-off. The frames in between (the ``ack``, the echo of your own message as
``user_message``, ``typing`` and ``thread``) are skipped; ``--frames`` prints every frame as it comes.

When a human holds the thread (an escalation was claimed, or is waiting in the queue), the bot stays
silent: the turn has no content and ``handled_by`` is ``human``; the script says so and waits up to
``--wait`` seconds for a staff reply (``human_message``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from typing import Any

from websockets.asyncio.client import connect


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Send one message over the chat WebSocket; print the reply.")
    parser.add_argument("token", help="the end user's chat token (POST /api/users/{user_id}/chat-token)")
    parser.add_argument("message", nargs="?", default="My login is broken", help="what the user says")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="the server (default: %(default)s)")
    parser.add_argument("--frames", action="store_true", help="print every frame received")
    parser.add_argument("--wait", type=float, default=0.0, help="seconds to wait for a staff reply")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the reply")
    return parser.parse_args()


def _summary(turn: dict[str, Any]) -> str:
    fields = ("thread_event", "intent", "confidence", "escalated", "offline", "handled_by")
    return "  ".join(f"{name}={turn.get(name)}" for name in fields)


async def chat(args: argparse.Namespace) -> int:
    ws_url = args.url.replace("http", "ws", 1).rstrip("/") + f"/ws/chat/?token={args.token}"
    # The server checks the Origin header, as browsers send it: say we come from the server's own site.
    async with connect(ws_url, origin=args.url.rstrip("/")) as ws:
        ready = json.loads(await ws.recv())
        if ready.get("type") != "ready":
            print(
                f"the server refused the connection: {ready.get('code')}: {ready.get('message')}",
                file=sys.stderr,
            )
            return 1
        print(f"connected as {ready['user_id']} to agent {ready['agent']}")
        client_id = f"ws-client-{uuid.uuid4().hex[:12]}"
        await ws.send(
            json.dumps({"type": "message", "client_message_id": client_id, "message": args.message})
        )
        print(f"you: {args.message}")
        streamed = False
        async with asyncio.timeout(args.timeout):
            while True:
                frame = json.loads(await ws.recv())
                if args.frames:
                    print(f"  frame: {json.dumps(frame)[:300]}")
                kind = frame.get("type")
                if kind == "error":
                    print(f"error: {frame.get('code')}: {frame.get('message')}", file=sys.stderr)
                    return 1
                if kind == "delta":
                    if not streamed:
                        print("bot (streaming): ", end="")
                        streamed = True
                    print(frame["text"], end="", flush=True)
                elif kind == "turn":
                    break
        if streamed:
            print()
        if frame.get("content"):
            print(f"bot: {frame['content']}")
        else:
            print("bot: (no reply: a human holds this thread; staff answer here until they hand it back)")
        print(_summary(frame))
        if args.wait > 0:
            try:
                async with asyncio.timeout(args.wait):
                    while True:
                        later = json.loads(await ws.recv())
                        if later.get("type") in ("human_joined", "human_message", "bot_back"):
                            print(f"{later['type']}: {later.get('content')}")
                            if later["type"] == "human_message":
                                break
            except TimeoutError:
                print(f"no staff reply within {args.wait:.0f} s")
    return 0


def main() -> None:
    sys.exit(asyncio.run(chat(_arguments())))


if __name__ == "__main__":
    main()
