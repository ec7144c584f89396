"""Tools the LLM may call, from an MCP server through a ``fastmcp.Client``."""

from __future__ import annotations

import json
import logging
import time
from abc import ABC, abstractmethod
from typing import Any

logger = logging.getLogger("agentflow.tools")


class ToolSource(ABC):
    """A family of tools: lists them in Anthropic's tool format and runs them."""

    @abstractmethod
    async def list_tools(self) -> list[dict[str, Any]]:
        """Tool specs as ``{"name", "description", "input_schema"}``."""

    @abstractmethod
    async def call_tool(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        """Run a tool. Returns ``(text result, is_error)``; never raises for a tool's own failure."""


class MCPToolSource(ToolSource):
    """Tools of an MCP server, through a ``fastmcp.Client`` (in memory, stdio or HTTP)."""

    def __init__(self, client: Any, *, cache_seconds: float = 60.0) -> None:
        self._client = client
        self._cache_seconds = cache_seconds
        self._cached: tuple[float, list[dict[str, Any]]] | None = None

    async def list_tools(self) -> list[dict[str, Any]]:
        if self._cached and time.monotonic() - self._cached[0] < self._cache_seconds:
            return self._cached[1]
        async with self._client:
            tools = await self._client.list_tools()
        specs = [
            {
                "name": tool.name,
                "description": tool.description or "",
                # fastmcp 4 / MCP SDK v2 name it ``input_schema``; ``inputSchema`` is the deprecated alias.
                "input_schema": _input_schema(tool) or {"type": "object", "properties": {}},
            }
            for tool in tools
        ]
        self._cached = (time.monotonic(), specs)
        return specs

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        try:
            async with self._client:
                result = await self._client.call_tool(name, arguments, raise_on_error=False)
        except Exception as exc:  # a broken tool server must not break the turn
            logger.warning("tool %s failed: %s", name, exc)
            return f"tool {name} failed: {exc}", True
        parts = [getattr(block, "text", None) for block in result.content]
        text = "\n".join(p for p in parts if p)
        if not text and result.structured_content is not None:
            text = json.dumps(result.structured_content)
        return text, bool(result.is_error)


async def tools_or_unavailable(
    source: ToolSource,
) -> tuple[list[dict[str, Any]] | None, dict[str, Any] | None]:
    """The source's tools, or ``(None, record)`` when its server cannot be reached.

    An unreachable MCP server must not fail the turn: the LLM answers without those tools, a warning
    is logged, and ``record`` (a ``tool_calls`` entry, shown in the admin) says why they were missing.
    """
    try:
        return await source.list_tools(), None
    except Exception as exc:
        logger.warning("tools unavailable, the turn runs without them: %s", exc)
        return None, {
            "name": "list_tools",
            "input": {},
            "is_error": True,
            "error": f"tools unavailable: {exc}",
        }


def _input_schema(tool: Any) -> dict[str, Any] | None:
    schema = getattr(tool, "input_schema", None)
    return schema if schema is not None else getattr(tool, "inputSchema", None)


def tool_source_for(mcp_client: Any) -> ToolSource | None:
    if mcp_client is None:
        return None
    if isinstance(mcp_client, ToolSource):
        return mcp_client
    if not hasattr(mcp_client, "list_tools") or not hasattr(mcp_client, "call_tool"):
        raise TypeError(
            f"build() takes a fastmcp.Client or an agentflow.tools.ToolSource as mcp_client;"
            f" got {type(mcp_client).__name__}"
        )
    return MCPToolSource(mcp_client)


class CombinedToolSource(ToolSource):
    """Several tool sources as one (an MCP server's tools and the integrations' tools).

    A source whose tools cannot be listed is left out of this turn with a warning (the others stay);
    a tool name two sources share goes to the first.
    """

    def __init__(self, *sources: ToolSource) -> None:
        self.sources = sources

    async def list_tools(self) -> list[dict[str, Any]]:
        specs: list[dict[str, Any]] = []
        seen: set[str] = set()
        failures: list[Exception] = []
        for source in self.sources:
            try:
                listed = await source.list_tools()
            except Exception as exc:
                logger.warning(
                    "tools of %s unavailable, the turn runs without them: %s", type(source).__name__, exc
                )
                failures.append(exc)
                continue
            for spec in listed:
                if spec["name"] in seen:
                    logger.warning("tool %s is offered twice; the first source's is kept", spec["name"])
                    continue
                seen.add(spec["name"])
                specs.append(spec)
        if failures and len(failures) == len(self.sources):
            raise failures[0]
        return specs

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> tuple[str, bool]:
        for source in self.sources:
            try:
                names = {spec["name"] for spec in await source.list_tools()}
            except Exception:
                continue
            if name in names:
                return await source.call_tool(name, arguments)
        return f"unknown tool {name}", True
