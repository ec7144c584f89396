"""What handlers and middleware see of a turn, and what they may return."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from .config import AgentFrameworkConfig
from .tools import ToolSource
from .types import Classification


@dataclass
class TurnContext:
    """One user message on its way through the pipeline.

    Handlers and middleware may read everything, append to ``system_additions`` (extra prompt
    text), set ``reply`` to answer without the LLM, set ``escalate`` to hand the thread to a human,
    and keep their own data in ``metadata``.
    """

    user_id: str
    message: str
    message_id: str
    session_id: str
    thread_id: str
    thread_event: str
    classification: Classification
    config: AgentFrameworkConfig
    history: list[dict[str, str]] = field(default_factory=list)
    thread_summary: str = ""  # the gist of the thread's messages older than ``history``
    memories: list[dict[str, Any]] = field(default_factory=list)
    tools: ToolSource | None = None
    system_additions: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)
    reply: str | None = None
    escalate: bool = False
    escalation_reason: str = ""

    @property
    def intent(self) -> str | None:
        return self.classification.intent

    @property
    def confidence(self) -> float:
        return self.classification.confidence


@dataclass
class HandlerResult:
    """A handler's answer. All fields optional: a handler may only enrich the prompt."""

    reply: str | None = None
    system_addition: str | None = None
    escalate: bool = False
    reason: str = ""


#: ``async def handler(ctx: TurnContext) -> str | HandlerResult | None``
Handler = Callable[[TurnContext], Awaitable["str | HandlerResult | None"]]


class Middleware:
    """Runs around every turn, in the order given to ``with_middleware`` (after-hooks in reverse).

    Override either hook; the defaults do nothing.
    """

    async def before_turn(self, ctx: TurnContext) -> None:
        """Before the reply is produced: add prompt context, set ``ctx.reply`` to short-circuit."""

    async def after_turn(self, ctx: TurnContext, reply: str) -> str:
        """After the reply is produced, before it is stored and sent. Returns the reply to keep."""
        return reply


_current_turn: ContextVar[TurnContext | None] = ContextVar("agentflow_current_turn", default=None)


@contextmanager
def turn_scope(ctx: TurnContext) -> Iterator[None]:
    """Within this block (a tool call), ``current_turn()`` is ``ctx``: a tool knows whose turn it serves."""
    token = _current_turn.set(ctx)
    try:
        yield
    finally:
        _current_turn.reset(token)


def current_turn() -> TurnContext | None:
    """The turn a tool is being called for, if any (also in threads started with its context)."""
    return _current_turn.get()
