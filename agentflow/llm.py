"""LLM backends. The default talks to Anthropic's Messages API through the official SDK.

A backend has one required method, :meth:`LLMBackend.generate`. The agent passes the model
parameters from ``llm_config`` on every call, so one backend serves any configuration.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from . import metrics
from .config import LLMConfig
from .errors import API_ERROR_STATUS, LLMError

TextCallback = Callable[[str], Awaitable[None]]

OFFLINE_NOTICE = (
    "[Offline mode] No AI assistant is available right now, so I can't answer this myself. "
    "Your message is saved in this conversation, where a member of our team can pick it up."
)


@dataclass
class LLMReply:
    """What the model answered."""

    text: str
    model: str
    stop_reason: str
    usage: dict[str, int] = field(default_factory=lambda: {"input_tokens": 0, "output_tokens": 0})
    content: list[dict[str, Any]] = field(default_factory=list)  # raw blocks (text, tool_use)
    latency_ms: float = 0.0
    offline: bool = False

    @property
    def tool_calls(self) -> list[dict[str, Any]]:
        return [block for block in self.content if block.get("type") == "tool_use"]


class LLMBackend(ABC):
    """A chat-completion provider."""

    #: True when the backend cannot reach a model (no key): the product runs in offline mode.
    offline: bool = False

    @abstractmethod
    async def generate(
        self,
        *,
        system: str,
        messages: list[dict[str, Any]],
        config: LLMConfig,
        tools: list[dict[str, Any]] | None = None,
        on_text: TextCallback | None = None,
        tool_choice: dict[str, Any] | None = None,
    ) -> LLMReply:
        """Ask the model for the next assistant message.

        Args:
            on_text: when given, the reply is streamed and each text delta is passed to it.
            tool_choice: force a tool (structured output), e.g. ``{"type": "tool", "name": "..."}``.

        Raises:
            LLMError: after the provider's own retries; ``transient`` tells whether to retry later.
        """


class OfflineBackend(LLMBackend):
    """Used when no API key is configured: says so, and offers a human."""

    offline = True

    async def generate(
        self,
        *,
        system: str,
        messages: list[dict[str, Any]],
        config: LLMConfig,
        tools: list[dict[str, Any]] | None = None,
        on_text: TextCallback | None = None,
        tool_choice: dict[str, Any] | None = None,
    ) -> LLMReply:
        if on_text is not None:
            await on_text(OFFLINE_NOTICE)
        return LLMReply(text=OFFLINE_NOTICE, model="offline", stop_reason="offline", offline=True)


_tls_context: Any = None


def llm_tls_context() -> Any:
    """The TLS settings every LLM client of this process uses (the SDK's default: system CAs, the
    ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` variables), made once.

    A client is made per event loop (each Celery worker thread's, ``AnthropicBackend``); made by
    the SDK, each loaded the certificate store again: ~34 ms of CPU per client, 64 times in a
    worker of 64 threads. A TLS context may be shared by connections of any thread.
    """
    global _tls_context
    if _tls_context is None:
        import httpx2

        _tls_context = httpx2.create_ssl_context()  # what the SDK's transport makes from verify=True
    return _tls_context


def _copy_for_another_loop(client: Any) -> Any:
    """``client`` with the same settings and a connection pool of its own (see ``AnthropicBackend``)."""
    import anthropic

    pool = getattr(client, "_client", None)
    fresh = (
        anthropic.DefaultAioHttpClient(verify=llm_tls_context())
        if isinstance(pool, anthropic.DefaultAioHttpClient)
        else anthropic.DefaultAsyncHttpxClient()
    )
    return client.copy(http_client=fresh)


def _on_aiohttp(client: Any) -> Any:
    """``client``, or a copy of it on the SDK's aiohttp transport when it uses the SDK's default one.

    ``AsyncAnthropic()`` with no ``http_client`` talks through httpx's pure-Python HTTP/1.1 stack,
    whose connection pool scans every pooled connection on each request: under a hundred concurrent
    turns that cost more CPU than the rest of the turn's Python. The SDK's ``DefaultAioHttpClient``
    (aiohttp's C parser) does the same requests with the same timeouts, retries, headers and proxy
    variables. A client given an ``http_client`` of its owner's choosing is used as it is.
    """
    try:
        import anthropic
        from anthropic._base_client import AsyncHttpxClientWrapper
    except ImportError:  # pragma: no cover - another SDK layout: use the client as given
        return client
    if type(getattr(client, "_client", None)) is not AsyncHttpxClientWrapper:
        return client
    try:
        return client.copy(http_client=anthropic.DefaultAioHttpClient(verify=llm_tls_context()))
    except RuntimeError:  # pragma: no cover - the aiohttp extra is missing
        return client


_whole: ContextVar[bool] = ContextVar("agentflow_llm_whole_replies", default=False)


@contextlib.contextmanager
def whole_replies() -> Iterator[None]:
    """Within this block ``AnthropicBackend`` asks for each reply whole, not streamed, and hands its
    text to ``on_text`` in one piece once it has arrived.

    For a caller whose ``on_text`` shows the text to nobody (a Celery turn with no chat socket or
    staff page listening: a REST caller): the turn goes as before (a streamed reply is judged as one,
    ``on_text`` still sees all the text) without reading a stream of events nobody watches, one SSE
    event per few words, each parsed into the SDK's models. A reply that might outlast the read
    timeout as one response (``max_tokens`` above ``timeout_seconds`` at the SDK's worst-case rate,
    ``WHOLE_SECONDS_PER_TOKEN``: 1,024 tokens within the default 60 s) is still streamed. Other
    backends ignore this and stream as before.
    """
    token = _whole.set(True)
    try:
        yield
    finally:
        _whole.reset(token)


# The SDK's own worst case for a reply that is not streamed: an hour for 128,000 output tokens.
WHOLE_SECONDS_PER_TOKEN = 3600 / 128_000


def _fits_one_response(config: LLMConfig) -> bool:
    """Whether a reply of ``max_tokens`` surely arrives within the client's read timeout as one
    response (which sends nothing until it is complete); a longer one is streamed."""
    return config.max_tokens * WHOLE_SECONDS_PER_TOKEN <= config.timeout_seconds


class _Reply:
    """A streamed reply put together from the Messages API's raw stream events (their JSON objects).

    What the SDK's ``messages.stream()`` helper gives at the end (``get_final_message()``), for what
    ``LLMReply`` keeps: the model, the stop reason, the usage and the content blocks as JSON dicts.
    The helper rebuilds a pydantic snapshot of the whole message on every event (and re-parses a tool
    call's partial JSON on every delta); here a block's text is gathered in pieces and joined, and a
    tool call's JSON is parsed once, at its ``content_block_stop``.
    """

    __slots__ = ("_json", "_pieces", "blocks", "model", "stop_reason", "usage")

    def __init__(self) -> None:
        self.model: str | None = None  # None until message_start
        self.stop_reason = ""
        self.usage = {"input_tokens": 0, "output_tokens": 0}
        self.blocks: list[dict[str, Any]] = []
        self._pieces: dict[int, list[str]] = {}  # index -> text (or thinking) pieces
        self._json: dict[int, list[str]] = {}  # index -> a tool call's partial JSON

    def feed(self, event: dict[str, Any]) -> str | None:
        """Take one event (its JSON object); return the text it adds to a text block, if any."""
        kind = event.get("type")
        if kind == "content_block_delta":
            delta = event["delta"]
            what = delta.get("type")
            index = event["index"]
            if what == "text_delta":
                pieces = self._pieces.get(index)
                if pieces is None or self.blocks[index]["type"] != "text":
                    return None
                text = str(delta["text"])
                pieces.append(text)
                return text
            if what == "input_json_delta":
                self._json.setdefault(index, []).append(delta["partial_json"])
            elif what == "thinking_delta":
                if self.blocks[index].get("type") == "thinking" and index in self._pieces:
                    self._pieces[index].append(delta["thinking"])
            elif what == "signature_delta":
                self.blocks[index]["signature"] = delta["signature"]
            elif what == "citations_delta":
                self.blocks[index].setdefault("citations", []).append(_without_none(delta["citation"]))
        elif kind == "content_block_start":
            index = event["index"]
            block = _without_none(event["content_block"])
            while len(self.blocks) <= index:
                self.blocks.append({})
            self.blocks[index] = block
            field_ = _GATHERED.get(block.get("type", ""))
            if field_ is not None:
                self._pieces[index] = [block.get(field_, "")]
        elif kind == "content_block_stop":
            self._close(event["index"])
        elif kind == "message_start":
            message = event["message"]
            self.model = str(message.get("model") or "")
            self.stop_reason = message.get("stop_reason") or ""
            self._count(message.get("usage"))
        elif kind == "message_delta":
            self.stop_reason = (event.get("delta") or {}).get("stop_reason") or ""
            self._count(event.get("usage"))
        return None

    def _count(self, usage: dict[str, Any] | None) -> None:
        # Counts on a message_delta are running totals; one it leaves out keeps message_start's.
        for name in ("input_tokens", "output_tokens"):
            value = usage.get(name) if usage else None
            if value is not None:
                self.usage[name] = int(value)

    def _close(self, index: int) -> None:
        block = self.blocks[index]
        pieces = self._pieces.pop(index, None)
        if pieces is not None:
            block[_GATHERED[block["type"]]] = "".join(pieces)
        partial = self._json.pop(index, None)
        if partial:
            raw = "".join(partial)
            if raw:
                try:
                    block["input"] = json.loads(raw)
                except ValueError:  # the stream broke off inside a tool call's input
                    raise _IncompleteStream(
                        f"the reply's stream ended inside the input of tool call {block.get('name', '?')!r}"
                    ) from None

    def finish(self) -> None:
        """Close the blocks a stream left open (it ended without their ``content_block_stop``)."""
        for index in list(self._pieces) + list(self._json):
            if 0 <= index < len(self.blocks):
                self._close(index)


#: Block type -> the field whose text arrives in deltas.
_GATHERED = {"text": "text", "thinking": "thinking"}


async def _stream_reply(client: Any, body: dict[str, Any], on_text: TextCallback) -> _Reply:
    """Ask for the reply streamed, hand each text delta to ``on_text``, and return it put together."""
    from . import llm_wire

    reply = _Reply()
    if llm_wire.takes_plain_json(client):
        stream: Any = await llm_wire.stream_message(client, body)
        plain = True
    else:  # Bedrock, Vertex, a traced client, a stand-in: its own create() and event models
        stream = await client.messages.create(**_create_kwargs(body), stream=True)
        plain = False
    async with stream:
        async for event in stream:
            text = reply.feed(event if plain else _without_none(event.model_dump(mode="json")))
            if text:
                await on_text(text)
    reply.finish()
    if reply.model is None:
        # The SDK's helper fails the same way (no message_start, no message): say it as an LLMError.
        raise _IncompleteStream("the reply's stream ended before it began (no message_start)")
    return reply


async def _whole_reply(client: Any, body: dict[str, Any]) -> dict[str, Any]:
    """Ask for the reply whole; its JSON object."""
    from . import llm_wire

    if llm_wire.takes_plain_json(client):
        message = await llm_wire.create_message(client, body)
    else:
        message = (await client.messages.create(**_create_kwargs(body))).model_dump(mode="json")
    if not isinstance(message, dict) or not isinstance(message.get("content"), list):
        raise _IncompleteStream(
            f"the API answered with something other than a message: {str(message)[:200]!r}"
        )
    return message


def _create_kwargs(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` as arguments of the SDK's ``messages.create`` (sampling parameters go in ``extra_body``)."""
    kwargs = dict(body)
    kwargs["extra_body"] = {"temperature": kwargs.pop("temperature")}
    return kwargs


def _without_none(value: Any) -> Any:
    """A block (or event) as the SDK's ``model_dump(exclude_none=True)`` gave it: no null fields at
    any depth, except inside a tool call's ``input``, which is the model's JSON as it came."""
    if isinstance(value, dict):
        return {
            key: item if key == "input" else _without_none(item)
            for key, item in value.items()
            if item is not None
        }
    if isinstance(value, list):
        return [_without_none(item) for item in value]
    return value


class _IncompleteStream(Exception):
    pass


def _error_status(exc: Any) -> int:
    """The HTTP status an API error stands for.

    An error the API sends once a stream has begun (an SSE ``error`` event, ``overloaded_error``
    the usual one) arrives on the 200 response: the SDK raises it as ``APIStatusError`` with status
    200. Its body's error type says what the status would have been (an unknown type: 500, the API
    failed the reply), so that an overload midway is transient as it is before the stream begins.
    """
    status = int(exc.status_code)
    if status >= 400:
        return status
    body: dict[str, Any] = exc.body if isinstance(exc.body, dict) else {}
    inner = body.get("error")
    error: dict[str, Any] = inner if isinstance(inner, dict) else body
    return API_ERROR_STATUS.get(str(error.get("type", "")), 500)


def _has_key(client: Any) -> bool:
    return bool(getattr(client, "api_key", None) or getattr(client, "auth_token", None))


class AnthropicBackend(LLMBackend):
    """Anthropic's Messages API via ``anthropic.AsyncAnthropic``.

    Give either a ``client`` or a ``client_factory`` (one client per event loop, so Celery worker
    threads each keep their own connections). A given ``client`` serves the event loop that first
    uses it; another loop (a script's memory jobs run on their own threads) gets a copy of it with a
    connection pool of its own: a pooled connection belongs to one loop, and sharing it failed those
    calls with "Connection error". That holds after the first loop has closed too (a script calling
    ``asyncio.run`` twice): the given client's pool still belongs to the closed loop. A copy keeps
    the key, base URL, headers and options, and gets the SDK's default HTTP client of the same kind
    (httpx or aiohttp).
    """

    def __init__(self, client: Any = None, *, client_factory: Callable[[], Any] | None = None) -> None:
        if (client is None) == (client_factory is None):
            raise ValueError("AnthropicBackend needs exactly one of client or client_factory")
        self._client = client
        self._client_loop: weakref.ReferenceType[asyncio.AbstractEventLoop] | None = None
        self._factory = client_factory
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        # with_options() copies the client (~0.5 ms); keep one copy per client and option set.
        self._configured: weakref.WeakKeyDictionary[Any, dict[tuple[int, float], Any]] = (
            weakref.WeakKeyDictionary()
        )

    async def aclose(self) -> None:
        """Close the clients this backend made for the running event loop."""
        client = self._per_loop.pop(asyncio.get_running_loop(), None)
        if client is not None:
            for copy in self._configured.pop(client, {}).values():
                await copy.close()
            await client.close()

    def client(self) -> Any:
        loop = asyncio.get_running_loop()
        if self._client is not None:
            if self._client_loop is None:  # the given client's first loop becomes its home
                self._client_loop = weakref.ref(loop)
            if self._client_loop() is loop:
                return self._client
        client = self._per_loop.get(loop)
        if client is None:
            client = self._factory() if self._factory is not None else _copy_for_another_loop(self._client)
            self._per_loop[loop] = client
        return client

    async def generate(
        self,
        *,
        system: str,
        messages: list[dict[str, Any]],
        config: LLMConfig,
        tools: list[dict[str, Any]] | None = None,
        on_text: TextCallback | None = None,
        tool_choice: dict[str, Any] | None = None,
    ) -> LLMReply:
        import anthropic

        base = self.client()
        options = (config.max_retries, config.timeout_seconds)
        copies = self._configured.setdefault(base, {})
        client = copies.get(options)
        if client is None:
            client = copies[options] = base.with_options(max_retries=options[0], timeout=options[1])
        body: dict[str, Any] = {
            "model": config.model,
            "max_tokens": config.max_tokens,
            "system": system,
            "messages": messages,
            "temperature": config.temperature,
        }
        if tools:
            body["tools"] = tools
        if tool_choice:
            body["tool_choice"] = tool_choice
        whole = on_text is None or (_whole.get() and _fits_one_response(config))
        started = time.perf_counter()
        try:
            if whole or on_text is None:
                message = await _whole_reply(client, body)
            else:
                streamed = await _stream_reply(client, body, on_text)
        except anthropic.APIStatusError as exc:
            status = _error_status(exc)
            metrics.llm_call_count(model=config.model, error=metrics.llm_error_kind(status))
            transient = status in (408, 409, 429) or status >= 500
            where = "" if status == exc.status_code else " (in the middle of the stream)"
            raise LLMError(
                f"Anthropic API error {status}{where}: {exc.message}", transient=transient
            ) from exc
        except anthropic.APIConnectionError as exc:  # includes APITimeoutError
            metrics.llm_call_count(model=config.model, error=metrics.llm_error_kind(None))
            raise LLMError(f"could not reach the Anthropic API: {exc}", transient=True) from exc
        except _IncompleteStream as exc:
            metrics.llm_call_count(model=config.model, error=metrics.llm_error_kind(None))
            raise LLMError(str(exc), transient=True) from exc
        latency_ms = (time.perf_counter() - started) * 1000
        if whole or on_text is None:
            blocks = [_without_none(block) for block in message["content"]]
            model, stop_reason = str(message.get("model") or ""), message.get("stop_reason") or ""
            counts = message.get("usage") or {}
            usage = {
                "input_tokens": int(counts.get("input_tokens") or 0),
                "output_tokens": int(counts.get("output_tokens") or 0),
            }
        else:
            blocks, usage = streamed.blocks, streamed.usage
            model, stop_reason = str(streamed.model), streamed.stop_reason
        text = "".join(block.get("text", "") for block in blocks if block.get("type") == "text")
        if whole and on_text is not None and text:
            await on_text(text)
        metrics.llm_call_count(model=config.model, usage=usage)
        return LLMReply(
            text=text,
            model=model,
            stop_reason=stop_reason,
            usage=usage,
            content=blocks,
            latency_ms=latency_ms,
        )


def backend_for(llm_client: Any) -> LLMBackend:
    """Adapt what ``build(llm_client)`` was given: a backend, an ``AsyncAnthropic``, or None (offline)."""
    if llm_client is None:
        return OfflineBackend()
    if isinstance(llm_client, LLMBackend):
        return llm_client
    try:
        import anthropic
    except ImportError:  # pragma: no cover - anthropic is a dependency
        anthropic = None  # type: ignore[assignment]
    if anthropic is not None and isinstance(llm_client, anthropic.Anthropic):
        raise TypeError(
            "build() needs an anthropic.AsyncAnthropic client (the synchronous Anthropic was given)"
        )
    messages = getattr(llm_client, "messages", None)
    create = getattr(messages, "create", None)
    # The SDK wraps ``create`` in decorators (``required_args``) that hide the coroutine function.
    is_async = create is not None and inspect.iscoroutinefunction(inspect.unwrap(create))
    is_async_anthropic = anthropic is not None and isinstance(llm_client, anthropic.AsyncAnthropic)
    if not (is_async_anthropic or is_async):
        raise TypeError(
            f"build() takes an anthropic.AsyncAnthropic client or an agentflow.llm.LLMBackend;"
            f" got {type(llm_client).__name__}"
        )
    if not _has_key(llm_client):
        return OfflineBackend()
    return AnthropicBackend(_on_aiohttp(llm_client) if is_async_anthropic else llm_client)
