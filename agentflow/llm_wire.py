"""The Messages API call itself, through the ``anthropic`` SDK's request layer, with plain JSON in and out.

``AsyncAnthropic.messages.create`` walks its arguments into a fresh copy of the body
(``async_prepare_request_data``) before encoding it, and on the way back builds a pydantic model per
streamed event (``RawMessageStreamEvent``) or for the whole ``Message``, which ``agentflow.llm`` then
dumps back into dicts. Here the body is encoded once, by us, from the plain dicts it is made of, and
posted with the client's own ``post`` (its base URL, auth and default headers, request hooks, retries
with backoff, timeouts and error classes are the SDK's as before); a streamed reply is read by an
``AsyncStream`` whose events are the JSON objects themselves, a reply asked whole is the JSON object.

The stream keeps the SDK's rules for events: ``ping`` and unnamed events are skipped, an ``error``
event raises the client's ``APIStatusError`` for it (status 200: the stream had begun), an event
with data is handed on whatever its name (the reader ignores the types it does not know).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import AsyncIterator
from typing import Any

import anthropic
from anthropic._base_client import BaseClient

try:  # the SDK's list of models past their end of life (messages.create warns about them)
    from anthropic._data.deprecated_models import DEPRECATED_MODELS
except ImportError:  # pragma: no cover - another SDK layout
    DEPRECATED_MODELS = {}

PATH = "/v1/messages"
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)


def takes_plain_json(client: Any) -> bool:
    """Whether ``client`` is an ``AsyncAnthropic`` that reads streams as server-sent events and
    records no OpenTelemetry span of its calls: then the call may go through ``create_message`` /
    ``stream_message``.

    Bedrock's and Vertex's clients are not ``AsyncAnthropic``s (Bedrock streams AWS event-stream
    frames); ``AsyncAnthropicAWS`` is one and speaks SSE. The span of a traced call describes the
    request and the reply from the SDK's own body and models, so a client whose spans go to a
    tracer provider someone set up keeps ``messages.create`` too.
    """
    if not isinstance(client, anthropic.AsyncAnthropic):
        return False
    if type(client)._make_sse_decoder is not BaseClient._make_sse_decoder:
        return False
    return not _traced(client)


def _traced(client: Any) -> bool:
    options = getattr(client, "open_telemetry", None)
    if options is None:  # an SDK without OpenTelemetry support
        return False
    if not options["traces"]["enabled"]:
        return False
    try:
        from opentelemetry import trace
    except ImportError:  # the SDK then has no spans
        return False
    provider = options.get("tracer_provider") or trace.get_tracer_provider()
    # OpenTelemetry's defaults until an SDK's provider is set: their spans record nothing.
    return not isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider)


class EventStream(anthropic.AsyncStream[dict[str, Any]]):
    """A streamed reply's events as the JSON objects the API sent (no model per event)."""

    async def __stream__(self) -> AsyncIterator[dict[str, Any]]:
        response = self.response
        loads = json.loads
        pending = b""
        try:
            async for chunk in response.aiter_bytes():
                pending += chunk
                if b"\r" in pending:  # CRLF or CR line ends; a CR at the end may be half a CRLF
                    keep = pending.endswith(b"\r")
                    body = pending[:-1] if keep else pending
                    pending = body.replace(b"\r\n", b"\n").replace(b"\r", b"\n") + (b"\r" if keep else b"")
                if b"\n\n" not in pending:
                    continue
                *blocks, pending = pending.split(b"\n\n")
                for block in blocks:
                    event, data = _parse_block(block)
                    if event is None or event == b"ping":
                        continue
                    if event == b"error":
                        self._raise_error(data)
                    if data:
                        yield loads(data)
            # A last event without its blank line is dropped, as the SDK's decoder drops it.
        finally:
            await response.aclose()

    def _raise_error(self, data: bytes | None) -> None:
        text = (data or b"").decode("utf-8", "replace")
        body: object = text
        try:
            body = json.loads(text)
            message = f"{body}"
        except ValueError:
            message = text or f"Error code: {self.response.status_code}"
        raise self._client._make_status_error(message, body=body, response=self.response)


def _parse_block(block: bytes) -> tuple[bytes | None, bytes | None]:
    """One event's name and data (data lines joined with newlines), as the SSE rules read them."""
    event: bytes | None = None
    data: bytes | None = None
    for line in block.split(b"\n"):
        name, _, value = line.partition(b":")
        if value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            data = value if data is None else data + b"\n" + value
        elif name == b"event":
            event = value or None
    return event, data


def _content(body: dict[str, Any]) -> dict[str, Any]:
    """The request options that send ``body`` as JSON we encoded (the SDK's encoding, without its
    walk over the body), or that hand it to the SDK when it holds something JSON cannot say."""
    try:
        return {"content": _ENCODER.encode(body).encode()}
    except (TypeError, ValueError):  # e.g. a pydantic model or a date in a tool result
        return {"body": body}


async def create_message(client: Any, body: dict[str, Any]) -> Any:
    """POST ``body`` to the Messages API; the reply's JSON object (a dict when the API is sane)."""
    _warn_if_deprecated(body)
    return await client.post(PATH, cast_to=object, **_content(body))


async def stream_message(client: Any, body: dict[str, Any]) -> EventStream:
    """POST ``body`` with ``"stream": true``; its events, once the response has begun."""
    _warn_if_deprecated(body)
    stream: EventStream = await client.post(
        PATH, cast_to=object, **_content({**body, "stream": True}), stream=True, stream_cls=EventStream
    )
    return stream


def _warn_if_deprecated(body: dict[str, Any]) -> None:
    model = body.get("model")
    if model in DEPRECATED_MODELS:
        warnings.warn(
            f"The model '{model}' is deprecated and will reach end-of-life on {DEPRECATED_MODELS[model]}.",
            DeprecationWarning,
            stacklevel=4,
        )
