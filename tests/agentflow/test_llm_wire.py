"""The Messages API call through the SDK's request layer with plain JSON in and out (agentflow.llm_wire).

Against the fake Messages API with the real SDK: the backend's plain-JSON path must send what
``messages.create`` sends, read the same reply, and fail with the same LLMError codes and
``transient`` flags; a client whose calls are traced (or that is no ``AsyncAnthropic``) keeps
``messages.create``.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import socket
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx2
import pytest
from anthropic.resources.messages import AsyncMessages
from opentelemetry import trace

from agentflow.config import LLMConfig
from agentflow.errors import LLMError
from agentflow.llm import AnthropicBackend, LLMReply, _Reply
from agentflow.llm_wire import EventStream, takes_plain_json
from agentflow.testing.fake_anthropic import FakeReply, ToolCall, estimate_tokens

MODEL = "claude-haiku-5-5"
HISTORY = [{"role": "user", "content": "Where is my order A-1?"}]
TOOLS = [{"name": "lookup", "description": "Find an order", "input_schema": {"type": "object"}}]
LOOKUP = {"order": "A-1", "fields": ["eta", None], "note": "ünïcode ✓"}


class _Provider(trace.TracerProvider):
    """A tracer provider someone set up (its spans record nothing here, which does not matter)."""

    def get_tracer(self, *args: Any, **kwargs: Any) -> trace.Tracer:
        return trace.NoOpTracer()


def _traced_client(base_url: str, **options: Any) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        api_key="test-key", base_url=base_url, open_telemetry={"tracer_provider": _Provider()}, **options
    )


def _ask(
    backend: AnthropicBackend, config: LLMConfig, *, streamed: bool, **extra: Any
) -> tuple[LLMReply, list[str]]:
    pieces: list[str] = []

    async def on_text(text: str) -> None:
        pieces.append(text)

    async def ask() -> LLMReply:
        try:
            return await backend.generate(
                system="Be brief.",
                messages=extra.pop("messages", HISTORY),
                config=config,
                on_text=on_text if streamed else None,
                **extra,
            )
        finally:
            await backend.aclose()
            await backend.client().close()

    loop = asyncio.new_event_loop()
    try:
        return loop.run_until_complete(ask()), pieces
    finally:
        loop.close()


@pytest.fixture
def creates(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each call of the SDK's ``AsyncMessages.create``: whether it streamed."""
    calls: list[bool] = []
    original = AsyncMessages.create

    async def counting(self: AsyncMessages, **kwargs: Any) -> Any:
        calls.append(bool(kwargs.get("stream")))
        return await original(self, **kwargs)

    monkeypatch.setattr(AsyncMessages, "create", counting)
    return calls


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize(
    "reply",
    [
        FakeReply(text="Your order ships today, within three to five days."),
        FakeReply(text="Let me look.", tool_calls=[ToolCall("lookup", LOOKUP, id="toolu_1")]),
    ],
    ids=["text", "tool_use"],
)
def test_the_plain_json_path_sends_and_reads_what_messages_create_does(
    fake_llm, creates: list[bool], reply: FakeReply, streamed: bool
) -> None:
    config = LLMConfig(model=MODEL, max_retries=0, timeout_seconds=30, temperature=0.3)
    plain = anthropic.AsyncAnthropic(api_key="test-key", base_url=fake_llm.base_url)
    assert takes_plain_json(plain) and not takes_plain_json(_traced_client(fake_llm.base_url))
    fake_llm.enqueue(reply, reply)

    ours, our_pieces = _ask(AnthropicBackend(plain), config, streamed=streamed, tools=TOOLS)
    assert creates == []  # no messages.create: no body walk, no model per event
    theirs, their_pieces = _ask(
        AnthropicBackend(_traced_client(fake_llm.base_url)), config, streamed=streamed, tools=TOOLS
    )
    assert creates == [streamed]

    keep = ("text", "content", "usage", "stop_reason", "model", "tool_calls")
    assert {name: getattr(ours, name) for name in keep} == {name: getattr(theirs, name) for name in keep}
    assert our_pieces == their_pieces and "".join(our_pieces) == (ours.text if streamed else "")
    ours_sent, theirs_sent = fake_llm.requests
    assert ours_sent["body"] == theirs_sent["body"]
    assert ours_sent["body"]["temperature"] == 0.3 and ours_sent["body"].get("stream") is (streamed or None)
    same = (
        "authorization",
        "x-api-key",
        "anthropic-version",
        "content-type",
        "user-agent",
        "x-stainless-timeout",
    )
    assert {h: ours_sent["headers"].get(h) for h in same} == {h: theirs_sent["headers"].get(h) for h in same}
    assert ours_sent["headers"]["authorization"] == "Bearer test-key"
    # The usage: input tokens from message_start, output tokens from message_delta's running total.
    output = (reply.text or "") + "".join(json.dumps(call.input) for call in reply.tool_calls)
    assert ours.usage["output_tokens"] == estimate_tokens(output) > 1 and ours.usage["input_tokens"] > 0
    if reply.tool_calls:
        assert ours.stop_reason == "tool_use"
        assert ours.tool_calls == [{"type": "tool_use", "id": "toolu_1", "name": "lookup", "input": LOOKUP}]


@pytest.mark.parametrize("streamed", [True, False], ids=["streamed", "whole"])
@pytest.mark.parametrize(
    ("status", "error_type", "transient", "raised"),
    [
        (429, "rate_limit_error", True, anthropic.RateLimitError),
        (500, "api_error", True, anthropic.InternalServerError),
        (529, "overloaded_error", True, anthropic.OverloadedError),
        (400, "invalid_request_error", False, anthropic.BadRequestError),
        (401, "authentication_error", False, anthropic.AuthenticationError),
    ],
)
def test_an_http_error_is_the_llm_error_it_was(
    anthropic_client, fake_llm, status: int, error_type: str, transient: bool, raised: type, streamed: bool
) -> None:
    fake_llm.enqueue_error(status, error_type, "scripted failure")
    config = LLMConfig(model=MODEL, max_retries=0, timeout_seconds=10)
    with pytest.raises(LLMError, match=f"Anthropic API error {status}: ") as failed:
        _ask(AnthropicBackend(anthropic_client), config, streamed=streamed)
    assert failed.value.transient is transient and failed.value.code == "llm_error"
    assert type(failed.value.__cause__) is raised
    assert "(in the middle of the stream)" not in str(failed.value)


def test_the_sdk_retries_an_overload_with_backoff_then_answers(anthropic_client, fake_llm) -> None:
    fake_llm.enqueue_error(529, "overloaded_error", retry_after=0, times=2)
    fake_llm.enqueue(FakeReply(text="third time lucky"))
    config = LLMConfig(model=MODEL, max_retries=2, timeout_seconds=10)
    reply, pieces = _ask(AnthropicBackend(anthropic_client), config, streamed=True)
    assert reply.text == "third time lucky" == "".join(pieces)
    sent = fake_llm.requests
    assert [r["headers"]["x-stainless-retry-count"] for r in sent] == ["0", "1", "2"]


def test_no_server_and_a_timeout_are_transient_connection_errors(anthropic_client, fake_llm) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    nobody = anthropic.AsyncAnthropic(api_key="test-key", base_url=f"http://127.0.0.1:{port}")
    config = LLMConfig(model=MODEL, max_retries=0, timeout_seconds=10)
    with pytest.raises(LLMError, match="could not reach the Anthropic API") as unreachable:
        _ask(AnthropicBackend(nobody), config, streamed=True)
    assert unreachable.value.transient and isinstance(
        unreachable.value.__cause__, anthropic.APIConnectionError
    )

    fake_llm.enqueue(FakeReply(text="too late", delay=1.0))
    hurried = LLMConfig(model=MODEL, max_retries=0, timeout_seconds=0.2)
    with pytest.raises(LLMError) as slow:
        _ask(AnthropicBackend(anthropic_client), hurried, streamed=False)
    assert slow.value.transient and isinstance(slow.value.__cause__, anthropic.APITimeoutError)


def test_a_body_json_cannot_say_is_left_to_the_sdk_to_encode(anthropic_client, fake_llm, creates) -> None:
    """A message holding something json cannot encode (a date from a tool) is sent as the SDK encodes it."""
    when = datetime.date(2026, 11, 30)
    fake_llm.enqueue(FakeReply(text="noted"))
    config = LLMConfig(model=MODEL, max_retries=0, timeout_seconds=10)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "due"}]},
        {"role": "assistant", "content": "ok"},
    ]
    messages[0]["content"].append({"type": "text", "text": when})  # type: ignore[attr-defined]
    reply, _ = _ask(AnthropicBackend(anthropic_client), config, streamed=True, messages=messages)
    assert reply.text == "noted" and creates == []
    assert fake_llm.requests[0]["body"]["messages"][0]["content"][1]["text"] == "2026-11-30"


def test_bedrock_and_vertex_clients_keep_messages_create() -> None:
    bedrock = anthropic.AsyncAnthropicBedrock(aws_region="us-east-1", aws_access_key="a", aws_secret_key="b")
    vertex = anthropic.AsyncAnthropicVertex(region="us-east5", project_id="p", access_token="t")
    assert not takes_plain_json(bedrock) and not takes_plain_json(vertex)
    assert not takes_plain_json(object())


def _events(stream_bytes: bytes, chunk: int) -> tuple[list[dict[str, Any]], EventStream]:
    """What EventStream yields for ``stream_bytes`` arriving ``chunk`` bytes at a time."""

    async def body() -> AsyncIterator[bytes]:
        for start in range(0, len(stream_bytes), chunk):
            yield stream_bytes[start : start + chunk]

    async def read() -> tuple[list[dict[str, Any]], EventStream]:
        request = httpx2.Request("POST", "http://127.0.0.1/v1/messages")
        response = httpx2.Response(200, content=body(), request=request)
        client = anthropic.AsyncAnthropic(api_key="k", base_url="http://127.0.0.1")
        stream = EventStream(cast_to=dict, response=response, client=client)
        return [event async for event in stream], stream

    return asyncio.run(read())


_SSE = (
    ": a comment line\n\n"
    'event: message_start\ndata: {"type":"message_start","message":{"model":"m","stop_reason":null,'
    '"usage":{"input_tokens":7,"output_tokens":1}}}\n\n'
    "event: ping\ndata: {}\n\n"
    'data: {"type":"unnamed events are skipped, as the SDK skips them"}\n\n'
    'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    '"content_block":{"type":"text","text":"","citations":null}}\n\n'
    'event: content_block_delta\r\ndata: {"type":"content_block_delta","index":0,\r\n'
    'data: "delta":{"type":"text_delta","text":"Hé "}}\r\n\r\n'
    'event: some_future_event\ndata: {"type":"some_future_event","index":0}\n\n'
    'event: content_block_delta\rdata: {"type":"content_block_delta","index":0,'
    '"delta":{"type":"text_delta","text":"there"}}\r\r'
    'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n\n'
    'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    '"usage":{"output_tokens":3}}\n\n'
    'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"a last event without'
)


@pytest.mark.parametrize("chunk", [1, 2, 7, 64, 100_000])
def test_the_event_stream_reads_sse_as_the_sdk_does_and_the_reply_ignores_unknown_events(chunk: int) -> None:
    """Comments, pings, unnamed events skipped; CRLF, CR and LF line ends; multi-line data; an event
    type nobody knows handed on and ignored; a last event without its blank line dropped; any
    chunking (a CRLF split between two chunks is one line end)."""
    events, _ = _events(_SSE.encode(), chunk)
    assert [event["type"] for event in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "some_future_event",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    reply = _Reply()
    pieces = [reply.feed(event) for event in events]
    reply.finish()
    assert [piece for piece in pieces if piece] == ["Hé ", "there"]
    assert reply.blocks == [
        {"type": "text", "text": "Hé there"}
    ]  # no "citations": null, as the SDK dumped it
    assert (reply.model, reply.stop_reason, reply.usage) == (
        "m",
        "end_turn",
        {"input_tokens": 7, "output_tokens": 3},
    )


def test_an_error_event_raises_the_sdks_status_error_for_it() -> None:
    sse = (
        'event: message_start\ndata: {"type":"message_start","message":{"model":"m","usage":{}}}\n\n'
        'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"busy"}}\n\n'
    )
    with pytest.raises(anthropic.APIStatusError) as failed:
        _events(sse.encode(), 5)
    assert failed.value.status_code == 200
    assert failed.value.body == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"}}
