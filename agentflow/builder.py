"""``AgentFrameworkBuilder``: collects the domain configuration; ``build()`` validates it once."""

from __future__ import annotations

import inspect
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from asgiref.sync import sync_to_async

from .config import ConfigSource, resolve_config
from .context import Handler, Middleware
from .errors import ConfigError
from .types import IntentCategory


class AgentFrameworkBuilder:
    """Fluent configuration of an agent, as in the seed README::

        agent = await (AgentFrameworkBuilder()
            .with_intent_categories(categories)
            .with_config("production.yaml")
            .build(llm_client, mcp_client))

    The builder only collects; ``build()`` checks everything and returns an immutable ``Agent``.
    """

    def __init__(self) -> None:
        self._categories: list[IntentCategory] | None = None
        self._handlers: dict[str, Handler] = {}
        self._sources: list[ConfigSource] = []
        self._thresholds: dict[str, float] = {}
        self._middleware: list[Middleware] = []
        self._log_level: str | None = None

    def with_intent_categories(self, categories: Sequence[IntentCategory]) -> AgentFrameworkBuilder:
        """The domain's intents, written to the database at ``build()``.

        The database is the source of truth at run time: the agent classifies against all active
        categories there, and ops staff own threshold, hand-off, active flag and prompt once a
        category exists (code sets them only when it creates the category). See docs/configuration.md.
        """
        if isinstance(categories, (str, bytes)) or not isinstance(categories, Sequence):
            raise ConfigError("with_intent_categories takes a list of IntentCategory")
        names: set[str] = set()
        for category in categories:
            if not isinstance(category, IntentCategory):
                raise ConfigError(
                    f"with_intent_categories takes IntentCategory items; got {type(category).__name__}"
                )
            if category.name in names:
                raise ConfigError(f"intent category {category.name} is defined twice")
            names.add(category.name)
        self._categories = list(categories)
        return self

    def with_handlers(self, handlers: Mapping[str, Handler]) -> AgentFrameworkBuilder:
        """Map intent names to ``async def handler(ctx) -> str | HandlerResult | None``."""
        if not isinstance(handlers, Mapping):
            raise ConfigError("with_handlers takes a mapping of intent name to async handler")
        for name, handler in handlers.items():
            if not callable(handler):
                raise ConfigError(f"handler for {name!r} is not callable")
            if not inspect.iscoroutinefunction(handler) and not inspect.iscoroutinefunction(
                type(handler).__call__
            ):
                raise ConfigError(f"handler for {name!r} must be an async function")
        self._handlers.update(handlers)
        return self

    def with_config(self, config: ConfigSource) -> AgentFrameworkBuilder:
        """A YAML file path, a dict or an ``AgentFrameworkConfig``. Several calls deep-merge."""
        self._sources.append(config)
        return self

    def with_confidence_thresholds(self, thresholds: Mapping[str, float]) -> AgentFrameworkBuilder:
        """Per-intent confidence the agent needs to answer alone; ``0.0`` means always a human."""
        if not isinstance(thresholds, Mapping):
            raise ConfigError(
                "with_confidence_thresholds takes a mapping of intent name to a number from 0 to 1"
            )
        for name, value in thresholds.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(
                    f"confidence threshold for {name!r} must be a number from 0 to 1; got {value!r}"
                )
            self._thresholds[str(name)] = float(value)
        return self

    def with_middleware(self, middleware: Sequence[Middleware]) -> AgentFrameworkBuilder:
        """Objects with async ``before_turn(ctx)`` / ``after_turn(ctx, reply)`` hooks, run in order."""
        if isinstance(middleware, Middleware) or not isinstance(middleware, Sequence):
            middleware = [middleware]  # a single object; the hook check below rejects anything else
        for mw in middleware:
            hooks = [getattr(mw, name, None) for name in ("before_turn", "after_turn")]
            if all(hook is None for hook in hooks):
                raise ConfigError(f"{type(mw).__name__} has neither before_turn nor after_turn")
            for name, hook in zip(("before_turn", "after_turn"), hooks, strict=True):
                if hook is not None and not inspect.iscoroutinefunction(hook):
                    raise ConfigError(f"{type(mw).__name__}.{name} must be an async method")
        self._middleware.extend(middleware)
        return self

    def with_logging(self, level: str | int = "INFO") -> AgentFrameworkBuilder:
        """Log each turn (user, thread event, intent, confidence, latency) to stderr."""
        name = logging.getLevelName(level) if isinstance(level, int) else str(level).upper()
        if name not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(
                f"with_logging level must be DEBUG, INFO, WARNING, ERROR or CRITICAL; got {level!r}"
            )
        self._log_level = name
        return self

    async def build(self, llm_client: Any = None, mcp_client: Any = None) -> Any:
        """Validate the configuration and return the agent.

        Args:
            llm_client: an ``anthropic.AsyncAnthropic`` (or an ``agentflow.llm.LLMBackend``).
                ``None`` or a client without an API key runs the agent in offline mode.
            mcp_client: a ``fastmcp.Client`` whose tools the LLM may call (optional).

        Raises:
            ConfigError: naming what is wrong.
        """
        from .bootstrap import ensure_django

        ensure_django()
        # Not thread-sensitive: build() may run inside a thread that is itself blocked in sync code
        # (an async agent factory called from get_agent), where the shared thread would deadlock.
        return await sync_to_async(self._build_in_own_thread, thread_sensitive=False)(llm_client, mcp_client)

    def _build_in_own_thread(self, llm_client: Any, mcp_client: Any) -> Any:
        from django.db import connections

        try:
            return self.build_sync(llm_client, mcp_client)
        finally:
            connections.close_all()  # this executor thread's own connections

    def build_sync(self, llm_client: Any = None, mcp_client: Any = None) -> Any:
        """``build()`` for synchronous code (Celery workers, management commands, agent factories)."""
        from .bootstrap import ensure_django

        ensure_django()
        from conversations.thread_features import load_model
        from intents.models import IntentCategory as IntentCategoryRow
        from intents.services import intent_categories_sync
        from intents.store import IntentStore

        from .agent import Agent
        from .bootstrap import ensure_schema
        from .embeddings import get_embedder
        from .llm import backend_for
        from .tools import tool_source_for

        if self._log_level:
            _configure_logging(self._log_level)
        overrides = {"confidence_config": {"intent_specific": self._thresholds}} if self._thresholds else None
        config = resolve_config(self._sources, overrides=overrides)
        try:
            llm = backend_for(llm_client)
            tools = tool_source_for(mcp_client)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        ensure_schema()
        known = {c.name for c in self._categories or ()} | set(
            IntentCategoryRow.objects.values_list("name", flat=True)
        )
        for name in [*config.confidence_config.intent_specific, *self._handlers]:
            if known and name not in known:
                raise ConfigError(f"{name!r} names no intent category; known: {', '.join(sorted(known))}")
        # Only a valid configuration is recorded for the admin: a failed build leaves no trace.
        if self._categories is not None:
            intent_categories_sync(
                categories=self._categories, thresholds=config.confidence_config.intent_specific
            )
        embedder = get_embedder()
        intents = IntentStore(embedder)
        intents.current()  # build the classifier now, not on the first message
        return Agent(
            config=config,
            intents=intents,
            handlers=self._handlers,
            middleware=tuple(self._middleware),
            llm=llm,
            tools=tools,
            embedder=embedder,
            thread_model=load_model(config.session_config.threading_profile),
        )


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("agentflow")
    logger.setLevel(level)
    if not any(getattr(h, "_agentflow", False) for h in logger.handlers) and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        handler._agentflow = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
