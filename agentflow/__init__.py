"""AgentFlow: configure domain behaviour; sessions, threading, intents, memory and hand-off come built in.

Importing this package does not touch Django or the database; ``build()`` sets them up.
"""

from typing import TYPE_CHECKING, Any

from .builder import AgentFrameworkBuilder
from .config import (
    AgentFrameworkConfig,
    ConfidenceConfig,
    InputConfig,
    LLMConfig,
    MemoryConfig,
    RateLimitConfig,
    SessionConfig,
)
from .context import HandlerResult, Middleware, TurnContext
from .errors import (
    AgentFlowError,
    AgentUnavailable,
    ConfigError,
    Forbidden,
    InvalidInput,
    LLMError,
    NotFound,
    RateLimited,
)
from .types import Classification, IntentCategory, IntentScore, ThreadEvent, TurnResult

__all__ = [
    "Agent",
    "AgentFlowError",
    "AgentFrameworkBuilder",
    "AgentFrameworkConfig",
    "AgentUnavailable",
    "Classification",
    "ConfidenceConfig",
    "ConfigError",
    "Forbidden",
    "HandlerResult",
    "InputConfig",
    "IntentCategory",
    "IntentScore",
    "InvalidInput",
    "LLMConfig",
    "LLMError",
    "MemoryConfig",
    "Middleware",
    "NotFound",
    "RateLimitConfig",
    "RateLimited",
    "SessionConfig",
    "ThreadEvent",
    "TurnContext",
    "TurnResult",
]

__version__ = "0.2.0"

if TYPE_CHECKING:
    from .agent import Agent


def __getattr__(name: str) -> Any:
    # ``Agent`` reaches Django models: imported on first use, so importing agentflow stays Django-free.
    if name == "Agent":
        from .agent import Agent

        return Agent
    raise AttributeError(f"module 'agentflow' has no attribute {name!r}")
