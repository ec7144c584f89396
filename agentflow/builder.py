"""``AgentFrameworkBuilder``: collects the domain configuration; ``build()`` validates it once."""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from asgiref.sync import sync_to_async

from . import built_here
from .config import ConfigSource, resolve_config_with_sources
from .context import Handler, Middleware
from .errors import ConfigError
from .types import IntentCategory

if TYPE_CHECKING:
    from .agent import Agent

logger = logging.getLogger("agentflow.builder")


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
        """The agent's intents, written to the database (for this agent only) at ``build()``.

        The database is the source of truth at run time: the agent classifies against its own active
        categories there. Code sets every field it defines on each build, except the fields staff
        changed in the admin, which keep the staff value (``build()`` logs a warning naming both).
        See docs/configuration.md.
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

    async def build(self, llm_client: Any = None, mcp_client: Any = None) -> Agent:
        """Validate the configuration, register the agent by name and return it.

        Args:
            llm_client: an ``anthropic.AsyncAnthropic`` (or an ``agentflow.llm.LLMBackend``).
                ``None`` or a client without an API key runs the agent in offline mode.
            mcp_client: a ``fastmcp.Client`` whose tools the LLM may call (optional).

        Returns:
            The immutable ``Agent``. This process runs the agent's turns and background jobs with
            it; other processes rebuild it by name (see ``agentflow.registry``).

        Raises:
            ConfigError: naming what is wrong.
        """
        from .bootstrap import ensure_django

        ensure_django()
        # Not thread-sensitive: build() may run inside a thread that is itself blocked in sync code
        # (an async agent factory called from the registry), where the shared thread would deadlock.
        return await sync_to_async(self._build_in_own_thread, thread_sensitive=False)(llm_client, mcp_client)

    def _build_in_own_thread(self, llm_client: Any, mcp_client: Any) -> Agent:
        from django.db import connections

        try:
            return self.build_sync(llm_client, mcp_client)
        finally:
            connections.close_all()  # this executor thread's own connections

    def build_sync(
        self,
        llm_client: Any = None,
        mcp_client: Any = None,
        *,
        name: str | None = None,
        origin: str = "script",
        local: bool = True,
        stored: Any = None,
    ) -> Agent:
        """``build()`` for synchronous code (Celery workers, management commands, agent factories).

        ``name``, ``origin`` and ``local`` are for ``agentflow.registry``: the name an agent is declared
        under (the configuration must give the same one), where its definition lives, and whether this process should prefer this very object
        (a script's build) over the registry's own. ``stored`` is an agent record to rebuild as it is
        (nothing is registered or written).
        """
        from .bootstrap import ensure_django

        ensure_django()
        from conversations.agents import agent_register
        from conversations.thread_features import load_model
        from intents.services import intent_categories_sync
        from intents.store import IntentStore

        from .agent import Agent
        from .bootstrap import ensure_schema
        from .embeddings import get_embedder
        from .llm import backend_for
        from .outbound import jira_tool
        from .tools import CombinedToolSource, tool_source_for

        if self._log_level:
            _configure_logging(self._log_level)
        overrides = {"confidence_config": {"intent_specific": self._thresholds}} if self._thresholds else None
        config, config_sources = resolve_config_with_sources(list(self._sources), overrides=overrides)
        if name is not None and config.name != name:
            raise ConfigError(
                f"{origin} built an agent named {config.name!r}; AGENTFLOW['AGENTS'] declares it as {name!r}"
            )
        try:
            llm = backend_for(llm_client)
            tools = tool_source_for(mcp_client)
        except TypeError as exc:
            raise ConfigError(str(exc)) from None
        jira = jira_tool(config)  # tools_config.jira_integration: the LLM's create_ticket tool
        if jira is not None:
            tools = jira if tools is None else CombinedToolSource(tools, jira)
        ensure_schema()
        from intents.models import IntentCategory as IntentCategoryRow

        known = {c.name for c in self._categories or ()} | set(
            IntentCategoryRow.objects.filter(agent__name=config.name).values_list("name", flat=True)
        )
        for intent in [*config.confidence_config.intent_specific, *self._handlers]:
            if known and intent not in known:
                raise ConfigError(
                    f"{intent!r} names no intent category of agent {config.name!r}; known: {', '.join(sorted(known))}"
                )
        code_parts = {
            "handlers": sorted(self._handlers),
            "middleware": [_qualname(mw) for mw in self._middleware],
            "tools": mcp_client is not None,
        }
        if stored is not None:
            record = stored
        else:
            # Only a valid configuration is recorded: a failed build leaves no trace.
            fingerprint = self._fingerprint(code_parts)
            earlier = built_here.get(config.name)
            shape = _shape(self._categories, code_parts)
            if earlier is not None and earlier.shape != shape:
                logger.warning(
                    "agent %r is defined again in this process with other categories, handlers or middleware; "
                    "the new definition replaces it. Give each agent its own name: with_config({'name': ...})",
                    config.name,
                )
            record = agent_register(
                name=config.name,
                config=config.model_dump(mode="json", exclude={"tools_config"}),
                fingerprint=fingerprint,
                code_parts=code_parts,
                origin=origin,
                sources=config_sources,
            )
            threshold_origin = {
                intent: ("code" if intent in self._thresholds else "config")
                for intent in config.confidence_config.intent_specific
            }
            intent_categories_sync(
                agent=record,
                categories=self._categories,
                thresholds=config.confidence_config.intent_specific,
                threshold_origin=threshold_origin,
            )
        embedder = get_embedder()
        intents = IntentStore(embedder, agent_id=record.pk)
        intents.current()  # build the classifier now, not on the first message
        agent = Agent(
            config=config,
            config_sources=config_sources,
            record_id=record.pk,
            version=record.version,
            fingerprint=record.fingerprint,
            shape=_shape(self._categories, code_parts),
            intents=intents,
            handlers=self._handlers,
            middleware=tuple(self._middleware),
            llm=llm,
            tools=tools,
            embedder=embedder,
            thread_model=load_model(config.session_config.threading_profile),
            runs_jobs_inline=local,
        )
        if local:
            built_here.remember(agent)
        return agent

    def _fingerprint(self, code_parts: Mapping[str, Any]) -> str:
        """A hash of the code-side definition: categories, thresholds, handlers, middleware, tools."""
        categories = [
            [
                c.name,
                c.description,
                list(c.examples),
                c.threshold,
                c.handoff,
                c.system_prompt,
                c.on_low_confidence,
            ]
            for c in self._categories or ()
        ]
        handlers = {k: _qualname(v) for k, v in sorted(self._handlers.items())}
        blob = json.dumps(
            [categories, sorted(self._thresholds.items()), handlers, dict(code_parts)],
            sort_keys=True,
            default=str,
        )
        return hashlib.sha256(blob.encode()).hexdigest()


def _shape(categories: Sequence[IntentCategory] | None, code_parts: Mapping[str, Any]) -> tuple[Any, ...]:
    """What makes two definitions different agents rather than two versions of one: the category
    names, handlers, middleware and tools (thresholds and wording may change between versions)."""
    names = tuple(sorted(c.name for c in categories)) if categories is not None else None
    return (names, tuple(code_parts["handlers"]), tuple(code_parts["middleware"]), code_parts["tools"])


def _qualname(obj: Any) -> str:
    target = obj if inspect.isfunction(obj) or inspect.isclass(obj) else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', type(obj).__name__)}"


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("agentflow")
    logger.setLevel(level)
    if not any(getattr(h, "_agentflow", False) for h in logger.handlers) and not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        handler._agentflow = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
