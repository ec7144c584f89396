"""One JSON POST with a timeout, classified for retrying: the integrations' HTTP client.

The standard library's ``urllib`` is enough for a webhook and one REST call, and keeps the core
free of another HTTP stack. A result is *transient* (worth retrying) when there was no response
(connection refused, reset, timeout), or the status is 408, 429 or 5xx; any other 4xx is final.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

USER_AGENT = "AgentFlow-integrations/1"
MAX_BODY = 64 * 1024  # of a response: enough for an error message or an issue key


@dataclass(frozen=True)
class HttpResult:
    """What one request got: a status (None without a response), the body, Retry-After in seconds."""

    status: int | None
    body: str = ""
    retry_after: float | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def transient(self) -> bool:
        return self.status is None or self.status in (408, 429) or self.status >= 500

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            return None

    def describe(self) -> str:
        """A short line for logs, audit rows and error messages (never the request's secrets)."""
        if self.status is None:
            return f"no response: {self.error}"
        snippet = " ".join(self.body.split())[:200]
        return f"HTTP {self.status}" + (f": {snippet}" if snippet else "")


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return None


def post_json(
    url: str, payload: Any, *, headers: Mapping[str, str] | None = None, timeout: float
) -> HttpResult:
    """POST ``payload`` as JSON to ``url``. Never raises for network or HTTP errors."""
    data = json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, method="POST")
    request.add_header("Content-Type", "application/json; charset=utf-8")
    request.add_header("Accept", "application/json")
    request.add_header("User-Agent", USER_AGENT)
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read(MAX_BODY).decode("utf-8", "replace")
            return HttpResult(response.status, body)
    except urllib.error.HTTPError as exc:
        body = exc.read(MAX_BODY).decode("utf-8", "replace") if exc.fp is not None else ""
        return HttpResult(exc.code, body, _retry_after(exc.headers.get("Retry-After")))
    except OSError as exc:  # URLError, timeouts, refused and reset connections
        reason = getattr(exc, "reason", exc)
        return HttpResult(None, error=str(reason) or type(exc).__name__)


def retry_delay(result: HttpResult, *, attempt: int, backoff: float, cap: float) -> float:
    """Seconds to wait before retry number ``attempt + 1``: Retry-After if given, else exponential."""
    if result.retry_after is not None:
        return min(result.retry_after, cap)
    return min(backoff * 2**attempt, cap)


def post_with_retries(
    url: str,
    payload: Any,
    *,
    headers: Mapping[str, str] | None = None,
    timeout: float,
    max_retries: int,
    backoff: float,
    cap: float = 30.0,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[HttpResult, int]:
    """``post_json``, retrying transient failures in this thread with backoff.

    Returns:
        The last result and how many requests were made.
    """
    attempt = 0
    while True:
        result = post_json(url, payload, headers=headers, timeout=timeout)
        if result.ok or not result.transient or attempt >= max_retries:
            return result, attempt + 1
        sleep(retry_delay(result, attempt=attempt, backoff=backoff, cap=cap))
        attempt += 1
