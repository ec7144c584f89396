"""HTTP rules for everything under ``/api/``: paths checked byte by byte, JSON errors, no caching.

``ApiHttpMiddleware`` (in ``settings.MIDDLEWARE``) does three things for ``/api/`` requests only:

* **Paths.** ASGI servers percent-decode the path with ``errors="replace"``, so ``/api/users/%FF%FF``
  and ``/api/users/%FE%FE`` would both name the user ``"\\ufffd\\ufffd"``. The raw path (ASGI
  ``raw_path``) is checked instead: a segment that is not UTF-8 once percent-decoded is a 400
  ``invalid_path``, and so is an encoded ``/`` (``%2F``) inside a segment: user ids cannot hold ``/``.
* **JSON errors.** Every 4xx/5xx that is not JSON already (Django's HTML 404 for an unknown route,
  ninja's bare 405, a 500) becomes the API's error shape ``{"error": {"code", "message"}}``.
* **Components down.** A PostgreSQL, Redis or channel-layer failure that escapes the API's own
  handlers (``agentflow.unavailable``) becomes a JSON 503 ``unavailable`` with ``Retry-After``.
* **No caching.** Responses carry ``Cache-Control: no-store``: they hold users' conversations and
  exports, which no browser or proxy should keep.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.http import HttpRequest, HttpResponse

from agentflow import logs
from agentflow.unavailable import is_unavailable, retry_after_seconds, unavailable_message

API_PREFIX = "/api/"
ERROR_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
    500: "server_error",
    503: "unavailable",
}


def api_error(status: int, code: str, message: str) -> HttpResponse:
    """A JSON error response in the API's shape, built without the ninja API object."""
    return HttpResponse(
        json.dumps({"error": {"code": code, "message": message}}),
        status=status,
        content_type="application/json; charset=utf-8",
    )


def raw_path_problem(raw_path: bytes) -> str | None:
    """Why a raw request path cannot address the API (not UTF-8, an encoded ``/``), or None."""
    for segment in raw_path.split(b"/"):
        if b"%" not in segment and segment.isascii():
            continue
        try:
            decoded = unquote_to_bytes(segment).decode("utf-8")
        except UnicodeDecodeError:
            return "the URL path is not valid UTF-8 once percent-decoded"
        if "/" in decoded:
            return "a path segment holds an encoded '/' (%2F); user ids cannot contain '/'"
    return None


class _SyncAndAsync:
    """A middleware that serves sync and async stacks alike (async under ASGI: no thread hop)."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], Any]) -> None:
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest) -> Any:
        raise NotImplementedError


class ApiHttpMiddleware(_SyncAndAsync):
    """See the module docstring. Requests outside ``/api/`` pass through untouched.

    Sync and async capable, so that under ASGI the async views are not pushed onto a thread.
    """

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self.is_async:
            return self.__acall__(request)
        if not request.path_info.startswith(API_PREFIX):
            return self.get_response(request)
        refused = self._refuse_path(request)
        return self._finish(request, refused or self.get_response(request))

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        if not request.path_info.startswith(API_PREFIX):
            return await self.get_response(request)
        refused = self._refuse_path(request)
        return self._finish(request, refused or await self.get_response(request))

    def process_exception(self, request: HttpRequest, exception: Exception) -> HttpResponse | None:
        """A view's infrastructure failure (one the ninja handlers did not answer): JSON 503."""
        if not request.path_info.startswith(API_PREFIX) or not is_unavailable(exception):
            return None
        response = api_error(503, "unavailable", unavailable_message(exception))
        response["Retry-After"] = str(retry_after_seconds())
        return response

    @staticmethod
    def _refuse_path(request: HttpRequest) -> HttpResponse | None:
        scope = getattr(request, "scope", None)
        raw_path = scope.get("raw_path") if isinstance(scope, dict) else None
        problem = raw_path_problem(raw_path) if isinstance(raw_path, bytes) else None
        return None if problem is None else api_error(400, "invalid_path", problem)

    def _finish(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        response = self._as_json(request, response)
        if not response.has_header("Cache-Control"):
            response["Cache-Control"] = "no-store"
        return response

    @staticmethod
    def _as_json(request: HttpRequest, response: HttpResponse) -> HttpResponse:
        status = response.status_code
        if status < 400 or response.get("Content-Type", "").startswith("application/json"):
            return response
        code = ERROR_CODES.get(status, "http_error")
        if status == 404:
            message = f"no API route matches {request.method} {request.path}"
        elif status == 405:
            allowed = response.get("Allow", "")
            message = f"{request.method} is not allowed here" + (f"; allowed: {allowed}" if allowed else "")
        elif status == 503:
            message = "a component is unavailable; try again shortly"
        elif status >= 500:
            message = "internal error; it has been logged"
        else:
            message = response.reason_phrase
        converted = api_error(status, code, message)
        for header in ("Allow", "Retry-After"):
            if response.has_header(header):
                converted[header] = response[header]
        return converted


_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")


class RequestIdMiddleware(_SyncAndAsync):
    """Give every request an id for the logs (``request_id``), and return it as ``X-Request-ID``.

    A well-formed ``X-Request-ID`` from the client or a proxy (1-64 letters, digits, ``._:-``) is kept;
    otherwise a new one is made. The id is bound to the request's logs (``agentflow.logs``) and
    carried into the Celery tasks it queues. Put it first in ``MIDDLEWARE``.
    """

    @staticmethod
    def _begin(request: HttpRequest) -> str:
        offered = request.headers.get("X-Request-ID", "")
        request_id = offered if _REQUEST_ID.fullmatch(offered) else uuid.uuid4().hex
        logs.unbind_all()
        logs.bind(request_id=request_id)
        return request_id

    def __call__(self, request: HttpRequest) -> HttpResponse | Awaitable[HttpResponse]:
        if self.is_async:
            return self.__acall__(request)
        request_id = self._begin(request)
        try:
            response = self.get_response(request)
        finally:
            logs.unbind_all()
        response["X-Request-ID"] = request_id
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponse:
        request_id = self._begin(request)
        try:
            response = await self.get_response(request)
        finally:
            logs.unbind_all()
        response["X-Request-ID"] = request_id
        return response
