"""Exceptions of the public API. Every one carries a stable ``code`` the transports pass on."""

from __future__ import annotations


class AgentFlowError(Exception):
    """Base class of AgentFlow's errors."""

    code = "agentflow_error"


class ConfigError(AgentFlowError, ValueError):
    """The configuration (YAML, dict, object or AGENT_* variable) is invalid."""

    code = "invalid_config"


class InvalidInput(AgentFlowError, ValueError):
    """A user id or message was rejected; nothing was stored.

    Attributes:
        field: the offending input field (``user_id``, ``message``...).
    """

    code = "invalid_input"

    def __init__(self, message: str, *, field: str) -> None:
        super().__init__(message)
        self.field = field


class NotFound(AgentFlowError, LookupError):
    """The user, session, thread or message does not exist for this user."""

    code = "not_found"


class RateLimited(AgentFlowError):
    """The user sent more messages than ``rate_limit_config`` allows; nothing was stored."""

    code = "rate_limited"

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class LLMError(AgentFlowError):
    """The LLM provider failed after the SDK's retries.

    Attributes:
        transient: True for rate limits, overload, 5xx and connection errors (worth retrying later).
    """

    code = "llm_error"

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class AgentUnavailable(AgentFlowError):
    """This process cannot run the agent faithfully (it is neither declared nor rebuildable here).

    The message is marked failed with this reason; it is never run with another agent's settings.
    """

    code = "agent_unavailable"


class Forbidden(AgentFlowError):
    """The caller may not act on this agent (an API key limited to another agent); nothing changed."""

    code = "forbidden"


#: The Anthropic Messages API's error types and the HTTP status each has when it is the response's
#: (an error sent midway through a stream comes on the stream's 200 and says only its type).
API_ERROR_STATUS: dict[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
