"""A fake of Anthropic's Messages API that runs on loopback.

Tests and benchmarks point the *real* ``anthropic`` SDK at it, so the whole client
stack (request building, retries, timeouts, SSE parsing, error classes) is exercised
without any network access or API key::

    from anthropic import AsyncAnthropic
    from agentflow.testing.fake_anthropic import FakeAnthropicServer, FakeReply, ToolCall

    with FakeAnthropicServer() as server:
        client = AsyncAnthropic(api_key="test-key", base_url=server.base_url)
        server.enqueue(FakeReply(text="Hello!"))
        server.enqueue(FakeReply(tool_calls=[ToolCall("get_weather", {"city": "Paris"})]))
        server.enqueue_error(429, retry_after=0)    # the SDK retries it by itself
        ...
        assert server.requests[0]["body"]["model"] == "claude-test"

The server runs its own asyncio loop in a daemon thread, so it is usable from sync and
async tests alike. Replies are taken from a FIFO queue; when the queue is empty the
reply is ``"Echo: <last user text>"``, unless ``server.responder`` (a function of the request
body returning a ``FakeReply`` or ``None``) scripts one from the request. ``server.latency`` (seconds) is slept before every
response and ``FakeReply.delay`` adds to it, which makes it usable to model a fixed LLM
latency in benchmarks. Every request is recorded in ``server.requests`` as
``{"method", "path", "headers", "body", "peer"}`` (``body`` is the parsed JSON or ``None``,
``peer`` the client's IP address).

Endpoints: ``POST /v1/messages`` (plain JSON or, with ``"stream": true``, the real SSE
event sequence) and ``POST /v1/messages/count_tokens``. Errors use the real body shape
``{"type": "error", "error": {"type": ..., "message": ...}}``; ``FakeReply(error_mid_stream=...)``
fails a stream after its first delta with an SSE ``error`` event, as the API does when it is
overloaded mid-reply.

Standalone: ``python -m agentflow.testing.fake_anthropic --port 8765 --latency 1.0``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import re
import signal
import threading
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from agentflow.errors import API_ERROR_STATUS

__all__ = ["FakeAnthropicServer", "FakeReply", "ToolCall"]

#: Error type -> HTTP status, as documented for the Messages API.
ERROR_STATUS: dict[str, int] = API_ERROR_STATUS
_STATUS_ERROR: dict[int, str] = {status: kind for kind, status in ERROR_STATUS.items()}
_RECORDED_HEADERS = (
    "x-api-key authorization anthropic-version anthropic-beta content-type user-agent"
    " x-stainless-retry-count x-stainless-timeout idempotency-key"
).split()
_WORD_CHUNK = re.compile(r"\s*\S+\s*")
_JSON_CHUNK_CHARS = 16


@dataclass
class ToolCall:
    """A ``tool_use`` block the fake model emits."""

    name: str
    input: dict[str, Any] = field(default_factory=dict)
    id: str | None = None  # generated ("toolu_fake_...") when None


@dataclass
class FakeReply:
    """One scripted response.

    ``text=None`` means "echo the last user message" unless there are tool calls.
    ``stop_reason=None`` is derived: ``"tool_use"`` with tool calls, else ``"end_turn"``.
    A ``status`` >= 400 or an ``error_type`` turns the reply into an API error.
    """

    text: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    stop_reason: str | None = None
    delay: float = 0.0
    status: int = 200
    error_type: str | None = None
    error_message: str | None = None
    headers: dict[str, str] | None = None
    #: An error type (``"overloaded_error"``, ...) the stream fails with after its first content
    #: delta, as an SSE ``error`` event on the 200 response, as the API does. A reply asked whole
    #: gets the error as an HTTP error (``ERROR_STATUS``) instead.
    error_mid_stream: str | None = None

    @property
    def is_error(self) -> bool:
        return self.status >= 400 or self.error_type is not None


def estimate_tokens(text: str) -> int:
    """Deterministic rough token count (~4 characters per token, at least 1)."""
    return max(1, math.ceil(len(text) / 4))


def error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


def _block_text(block: Any) -> str:
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return ""
    if block.get("type") == "text":
        return str(block.get("text", ""))
    if block.get("type") == "tool_result":
        content = block.get("content", "")
        inner = content if isinstance(content, str) else " ".join(_block_text(b) for b in content or [])
        return f"Tool result: {inner}"
    return ""


def last_user_text(messages: list[Any]) -> str:
    """Text of the last ``user`` message (string content or text/tool_result blocks)."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content", "")
            if isinstance(content, str):
                return content
            if isinstance(content, list):
                return " ".join(t for t in (_block_text(b) for b in content) if t)
    return ""


def _validate(body: Any) -> str | None:
    """Return an ``invalid_request_error`` message, or None when the body is acceptable."""
    if not isinstance(body, dict):
        return "Request body must be a JSON object."
    required = (("model", str, "string"), ("max_tokens", int, "integer"), ("messages", list, "list"))
    for name, kind, label in required:
        if name not in body:
            return f"{name}: Field required"
        value = body[name]
        if not isinstance(value, kind) or isinstance(value, bool):
            return f"{name}: Input should be a valid {label}"
    if not body["model"]:
        return "model: String should have at least 1 character"
    if body["max_tokens"] < 1:
        return "max_tokens: Input should be greater than or equal to 1"
    if not body["messages"]:
        return "messages: List should have at least 1 item"
    for i, message in enumerate(body["messages"]):
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if "content" not in message:
            return f"messages.{i}.content: Field required"
    if "stream" in body and not isinstance(body["stream"], bool):
        return "stream: Input should be a valid boolean"
    return None


def _input_tokens(body: dict[str, Any]) -> int:
    prompt = {k: body.get(k) for k in ("system", "messages", "tools")}
    return estimate_tokens(json.dumps(prompt, sort_keys=True, default=str))


def _event(kind: str, **fields: Any) -> tuple[str, dict[str, Any]]:
    return kind, {"type": kind, **fields}


def stream_events(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """The SSE ``(event name, data)`` sequence the real API sends for ``message``."""
    usage = message["usage"]
    start = {**message, "content": [], "stop_reason": None, "usage": {**usage, "output_tokens": 1}}
    events = [_event("message_start", message=start)]
    for index, block in enumerate(message["content"]):
        if block["type"] == "text":
            opening: dict[str, Any] = {"type": "text", "text": ""}
            pieces = _WORD_CHUNK.findall(block["text"]) or [block["text"]]
            deltas = [{"type": "text_delta", "text": piece} for piece in pieces]
        else:
            opening = {**block, "input": {}}
            payload = json.dumps(block["input"])
            deltas = [
                {"type": "input_json_delta", "partial_json": payload[i : i + _JSON_CHUNK_CHARS]}
                for i in range(0, len(payload), _JSON_CHUNK_CHARS)
            ]
        events.append(_event("content_block_start", index=index, content_block=opening))
        if index == 0:
            events.append(_event("ping"))
        events += [_event("content_block_delta", index=index, delta=delta) for delta in deltas]
        events.append(_event("content_block_stop", index=index))
    stop = {"stop_reason": message["stop_reason"], "stop_sequence": None}
    events += [_event("message_delta", delta=stop, usage=usage), _event("message_stop")]
    return events


class FakeAnthropicServer:
    """Loopback fake of ``POST /v1/messages``; see the module docstring."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, latency: float = 0.0) -> None:
        self.host = host
        self.port = port
        self.latency = latency
        self.chunk_delay = 0.0  # seconds slept between streamed deltas
        # Consulted when the queue is empty: a reply worked out from the request (benchmarks that
        # script verdicts per message); None falls back to the echo.
        self.responder: Callable[[dict[str, Any]], FakeReply | None] | None = None
        self._lock = threading.Lock()
        self._queue: deque[FakeReply] = deque()
        self._requests: list[dict[str, Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, timeout: float = 10.0) -> FakeAnthropicServer:
        """Bind and serve in a background thread; returns once the socket is listening."""
        if self._thread is not None:
            raise RuntimeError("FakeAnthropicServer is already running")
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-anthropic", daemon=True)
        self._thread.start()
        try:
            asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout)
        except BaseException:
            self._shutdown_loop()
            raise
        return self

    def stop(self, timeout: float = 10.0) -> None:
        """Stop serving (in-flight handlers are cancelled) and join the thread."""
        if self._loop is None:
            return
        if self._runner is not None:
            with contextlib.suppress(Exception):
                asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout)
            self._runner = None
        self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        assert self._loop is not None and self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()
        self._loop, self._thread = None, None

    def __enter__(self) -> FakeAnthropicServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def base_url(self) -> str:
        """Value for the SDK's ``base_url=`` (e.g. ``"http://127.0.0.1:54321"``)."""
        if self._runner is None:
            raise RuntimeError("FakeAnthropicServer is not running; call start() first")
        return f"http://{self.host}:{self.port}"

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/messages", self._handle_messages)
        app.router.add_post("/v1/messages/count_tokens", self._handle_count_tokens)
        app.router.add_route("*", "/{tail:.*}", self._handle_not_found)
        runner = web.AppRunner(app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port)
        await site.start()
        self.port = runner.addresses[0][1]
        self._runner = runner

    # -- scripting ---------------------------------------------------------------------------
    def enqueue(self, *replies: FakeReply) -> None:
        """Append scripted replies; each request to /v1/messages consumes one."""
        with self._lock:
            self._queue.extend(replies)

    def enqueue_error(
        self,
        status: int,
        error_type: str | None = None,
        message: str | None = None,
        *,
        retry_after: float | None = None,
        times: int = 1,
    ) -> None:
        """Enqueue ``times`` identical error replies.

        ``retry_after`` (seconds) sets ``retry-after`` and ``retry-after-ms``; 0 means
        "retry at once" (sent as 1 ms, since the SDK ignores a zero and backs off instead).
        """
        headers = None
        if retry_after is not None:
            headers = {
                "retry-after": str(math.ceil(retry_after)),
                "retry-after-ms": f"{max(retry_after * 1000, 1):g}",
            }
        reply = FakeReply(status=status, error_type=error_type, error_message=message, headers=headers)
        self.enqueue(*[reply] * times)

    @property
    def pending(self) -> int:
        """Number of scripted replies not yet consumed."""
        with self._lock:
            return len(self._queue)

    @property
    def requests(self) -> list[dict[str, Any]]:
        """Snapshot of every request received so far, oldest first."""
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        """Clear the reply queue, the recorded requests and the latency."""
        with self._lock:
            self._queue.clear()
            self._requests.clear()
        self.responder = None
        self.latency = 0.0
        self.chunk_delay = 0.0

    # -- request handling --------------------------------------------------------------------
    async def _read(self, request: web.Request) -> tuple[Any, web.Response | None]:
        """Record the request; return (body, early error response or None)."""
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        headers = {k: request.headers[k] for k in _RECORDED_HEADERS if k in request.headers}
        with self._lock:
            self._requests.append(
                {
                    "method": request.method,
                    "path": request.path,
                    "headers": headers,
                    "body": body,
                    "peer": request.remote,  # the client's address: which host (worker) called
                }
            )
        api_key = request.headers.get("x-api-key", "")
        bearer = request.headers.get("authorization", "")
        if not api_key and not (bearer.lower().startswith("bearer ") and bearer[7:].strip()):
            return body, self._error(401, "authentication_error", "x-api-key header is required")
        if body is None:
            return body, self._error(400, "invalid_request_error", "Request body must be valid JSON.")
        return body, None

    def _error(
        self, status: int, error_type: str | None, message: str | None, headers: dict[str, str] | None = None
    ) -> web.Response:
        fallback = "api_error" if status >= 500 else "invalid_request_error"
        kind = error_type or _STATUS_ERROR.get(status, fallback)
        text = message or f"Fake {kind} (HTTP {status})"
        all_headers = {"request-id": f"req_fake_{uuid.uuid4().hex[:24]}", **(headers or {})}
        return web.json_response(error_body(kind, text), status=status, headers=all_headers)

    async def _handle_not_found(self, request: web.Request) -> web.Response:
        return self._error(404, "not_found_error", f"Not found: {request.method} {request.path}")

    async def _handle_count_tokens(self, request: web.Request) -> web.Response:
        body, failure = await self._read(request)
        candidate = {"max_tokens": 1, **body} if isinstance(body, dict) else body
        if failure is None and (problem := _validate(candidate)) is not None:
            failure = self._error(400, "invalid_request_error", problem)
        return failure or web.json_response({"input_tokens": _input_tokens(body)})

    async def _handle_messages(self, request: web.Request) -> web.StreamResponse:
        body, failure = await self._read(request)
        if failure is None and (problem := _validate(body)) is not None:
            failure = self._error(400, "invalid_request_error", problem)
        if failure is not None:
            return failure
        with self._lock:
            reply = self._queue.popleft() if self._queue else None
        if reply is None:
            reply = (self.responder(body) if self.responder is not None else None) or FakeReply()
        wait = self.latency + reply.delay
        with self._lock:
            if self._requests:
                self._requests[-1]["waited"] = wait  # what the reply was held for (benchmarks, tests)
        if wait > 0:
            await asyncio.sleep(wait)
        if reply.is_error:
            status = reply.status if reply.status >= 400 else ERROR_STATUS.get(reply.error_type or "", 500)
            return self._error(status, reply.error_type, reply.error_message, reply.headers)
        midway = reply.error_mid_stream
        if midway is not None and not body.get("stream"):
            return self._error(ERROR_STATUS.get(midway, 500), midway, reply.error_message, reply.headers)
        message = self._build_message(body, reply)
        if body.get("stream"):
            return await self._stream(
                request, message, reply.headers, error=midway, error_message=reply.error_message
            )
        return web.json_response(message, headers=reply.headers)

    def _build_message(self, body: dict[str, Any], reply: FakeReply) -> dict[str, Any]:
        text = reply.text
        if text is None and not reply.tool_calls:
            text = f"Echo: {last_user_text(body['messages'])}"
        content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
        for call in reply.tool_calls:
            tool_id = call.id or f"toolu_fake_{uuid.uuid4().hex[:24]}"
            content.append({"type": "tool_use", "id": tool_id, "name": call.name, "input": call.input})
        output = (text or "") + "".join(json.dumps(c.input) for c in reply.tool_calls)
        return {
            "id": f"msg_fake_{uuid.uuid4().hex[:24]}",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": content,
            "stop_reason": reply.stop_reason or ("tool_use" if reply.tool_calls else "end_turn"),
            "stop_sequence": None,
            "usage": {
                "input_tokens": _input_tokens(body),
                "output_tokens": estimate_tokens(output),
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
            },
        }

    async def _stream(
        self,
        request: web.Request,
        message: dict[str, Any],
        headers: dict[str, str] | None,
        *,
        error: str | None = None,
        error_message: str | None = None,
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={"content-type": "text/event-stream", **(headers or {})})
        try:
            await response.prepare(request)
            for name, data in stream_events(message):
                await response.write(f"event: {name}\ndata: {json.dumps(data)}\n\n".encode())
                if error is not None and name == "content_block_delta":
                    failure = error_body(error, error_message or f"Fake {error} (mid-stream)")
                    await response.write(f"event: error\ndata: {json.dumps(failure)}\n\n".encode())
                    break
                if self.chunk_delay > 0 and name == "content_block_delta":
                    await asyncio.sleep(self.chunk_delay)
            await response.write_eof()
        except ConnectionError:  # client went away (timeout or closed stream): nothing to do
            pass
        return response


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the fake Anthropic Messages API on loopback.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--latency", type=float, default=0.0, help="seconds slept before every reply")
    parser.add_argument(
        "--chunk-delay",
        type=float,
        default=0.0,
        help="seconds slept between a streamed reply's text pieces (a word each), as a model writes",
    )
    args = parser.parse_args(argv)
    if args.chunk_delay < 0:
        parser.error(f"--chunk-delay must be 0 or more seconds; got {args.chunk_delay}")
    done = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):  # also when SIGINT is ignored (background job)
        signal.signal(signum, lambda *_: done.set())
    server = FakeAnthropicServer(args.host, args.port, latency=args.latency)
    server.chunk_delay = args.chunk_delay
    server.start()
    print(f"Fake Anthropic API listening on {server.base_url} (Ctrl-C to stop)", flush=True)
    try:
        while not done.wait(1.0):
            pass
    finally:
        server.stop()


if __name__ == "__main__":
    main()
