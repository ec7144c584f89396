"""AgentFlow: configure domain behaviour; sessions, threading, intents, memory and hand-off come built in.

Importing this package does not touch Django or the database; ``build()`` sets them up.
"""

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
from .errors import AgentFlowError, ConfigError, InvalidInput, LLMError, NotFound, RateLimited
from .types import Classification, IntentCategory, IntentScore, ThreadEvent, TurnResult

__all__ = [
    "AgentFlowError",
    "AgentFrameworkBuilder",
    "AgentFrameworkConfig",
    "Classification",
    "ConfidenceConfig",
    "ConfigError",
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

__version__ = "0.1.0"
