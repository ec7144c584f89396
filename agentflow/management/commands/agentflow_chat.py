"""Send one message as a user, in this process, and print the turn result as JSON."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from agentflow.conf import conf
from agentflow.errors import AgentFlowError
from agentflow.registry import agent_for


class Command(BaseCommand):
    help = "Run one turn: manage.py agentflow_chat --user alice 'My login is broken'"

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", required=True, help="the end user's id")
        parser.add_argument(
            "--agent", default=None, help="the agent's name (default: AGENTFLOW_DEFAULT_AGENT)"
        )
        parser.add_argument("message")

    def handle(self, *args: Any, user: str, message: str, agent: str | None = None, **options: Any) -> None:
        try:
            built = agent_for(agent or conf().DEFAULT_AGENT)
        except AgentFlowError as exc:
            raise CommandError(f"{exc.code}: {exc}") from None
        try:
            result = asyncio.run(self._turn(built, user, message))
        except AgentFlowError as exc:
            raise CommandError(f"{exc.code}: {exc}") from None
        self.stdout.write(json.dumps(result, indent=2, default=str))

    @staticmethod
    async def _turn(agent: Any, user: str, message: str) -> Any:
        try:
            return await agent.process_message(user_id=user, message=message)
        finally:
            # The loop ends with this command: close the LLM client made for it.
            aclose = getattr(agent.llm, "aclose", None)
            if aclose is not None:
                await aclose()
