"""Drive the real ``anthropic`` SDK against agentflow.testing.fake_anthropic."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anthropic
import pytest
from anthropic import AsyncAnthropic

from agentflow.testing.fake_anthropic import FakeAnthropicServer, FakeReply, ToolCall

MODEL = "claude-fake-1"
USER: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_TOOL = {
    "name": "get_weather",
    "description": "Current weather for a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}


@pytest.fixture(scope="module")
def server() -> Iterator[FakeAnthropicServer]:
    with FakeAnthropicServer() as srv:
        yield srv


@pytest.fixture(autouse=True)
def _clean(server: FakeAnthropicServer) -> None:
    server.reset()


@pytest.fixture
async def client(server: FakeAnthropicServer) -> AsyncIterator[AsyncAnthropic]:
    async with AsyncAnthropic(api_key="test-key", base_url=server.base_url, max_retries=1) as c:
        yield c


def raw_post(url: str, body: Any, headers: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


@pytest.mark.asyncio
async def test_text_reply_with_usage(server: FakeAnthropicServer, client: AsyncAnthropic) -> None:
    server.enqueue(FakeReply(text="Sunny and 21 degrees."))
    message: Any = await client.messages.create(model=MODEL, max_tokens=256, messages=USER)
    assert message.id.startswith("msg_fake_")
    assert message.model == MODEL and message.role == "assistant"
    assert [b.type for b in message.content] == ["text"]
    assert message.content[0].text == "Sunny and 21 degrees."
    assert message.stop_reason == "end_turn" and message.stop_sequence is None
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0


@pytest.mark.asyncio
async def test_streaming_text(server: FakeAnthropicServer, client: AsyncAnthropic) -> None:
    text = "It is sunny in Paris today, with a light breeze."
    server.enqueue(FakeReply(text=text))
    async with client.messages.stream(model=MODEL, max_tokens=256, messages=USER) as stream:
        chunks = [chunk async for chunk in stream.text_stream]
        final: Any = await stream.get_final_message()
    assert len(chunks) > 3
    assert "".join(chunks) == text
    assert final.content[0].type == "text" and final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 1


@pytest.mark.asyncio
async def test_raw_stream_event_sequence(server: FakeAnthropicServer, client: AsyncAnthropic) -> None:
    server.enqueue(FakeReply(text="a b", tool_calls=[ToolCall("get_weather", {"city": "Paris"})]))
    stream: Any = await client.messages.create(model=MODEL, max_tokens=64, messages=USER, stream=True)
    kinds = [event.type async for event in stream]
    assert kinds[0] == "message_start" and kinds[-2:] == ["message_delta", "message_stop"]
    assert kinds.count("content_block_start") == kinds.count("content_block_stop") == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("streaming", [False, True])
async def test_tool_use(server: FakeAnthropicServer, client: AsyncAnthropic, streaming: bool) -> None:
    args = {"city": "Paris", "units": "metric", "days": [1, 2, 3], "detail": {"hourly": True}}
    server.enqueue(FakeReply(text="Let me check.", tool_calls=[ToolCall("get_weather", args)]))
    kwargs: dict[str, Any] = {"model": MODEL, "max_tokens": 256, "messages": USER, "tools": [WEATHER_TOOL]}
    message: Any
    if streaming:
        async with client.messages.stream(**kwargs) as stream:
            message = await stream.get_final_message()
    else:
        message = await client.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    text_block, tool_block = message.content
    assert text_block.type == "text" and text_block.text == "Let me check."
    assert tool_block.type == "tool_use"
    assert tool_block.id.startswith("toolu_") and tool_block.name == "get_weather"
    assert tool_block.input == args
    assert server.requests[-1]["body"]["tools"] == [WEATHER_TOOL]


@pytest.mark.asyncio
async def test_rate_limit_exhausts_retries(server: FakeAnthropicServer, client: AsyncAnthropic) -> None:
    server.enqueue_error(429, message="slow down", retry_after=0, times=2)
    with pytest.raises(anthropic.RateLimitError) as info:
        await client.messages.create(model=MODEL, max_tokens=16, messages=USER)
    assert info.value.status_code == 429
    assert info.value.body == {"type": "error", "error": {"type": "rate_limit_error", "message": "slow down"}}
    assert [r["headers"]["x-stainless-retry-count"] for r in server.requests] == ["0", "1"]


@pytest.mark.asyncio
async def test_retry_then_success(server: FakeAnthropicServer, client: AsyncAnthropic) -> None:
    server.enqueue_error(500, retry_after=0)
    server.enqueue(FakeReply(text="recovered"))
    message: Any = await client.messages.create(model=MODEL, max_tokens=16, messages=USER)
    assert message.content[0].text == "recovered"
    assert len(server.requests) == 2 and server.pending == 0


@pytest.mark.asyncio
async def test_overloaded_and_server_errors(server: FakeAnthropicServer, client: AsyncAnthropic) -> None:
    server.enqueue(FakeReply(error_type="overloaded_error", headers={"x-should-retry": "false"}))
    with pytest.raises(anthropic.OverloadedError) as overloaded:
        await client.messages.create(model=MODEL, max_tokens=16, messages=USER)
    assert overloaded.value.status_code == 529 and overloaded.value.type == "overloaded_error"
    assert isinstance(overloaded.value, anthropic.InternalServerError)

    server.enqueue_error(500, retry_after=0, times=2)
    with pytest.raises(anthropic.APIStatusError) as failed:
        await client.messages.create(model=MODEL, max_tokens=16, messages=USER)
    assert failed.value.status_code == 500 and failed.value.type == "api_error"


def test_missing_api_key_is_401(server: FakeAnthropicServer) -> None:
    body = {"model": MODEL, "max_tokens": 16, "messages": USER}
    status, payload = raw_post(f"{server.base_url}/v1/messages", body, {"content-type": "application/json"})
    assert status == 401
    assert payload["type"] == "error" and payload["error"]["type"] == "authentication_error"
    status, _ = raw_post(f"{server.base_url}/v1/messages", body, {"authorization": "Bearer tok"})
    assert status == 200


@pytest.mark.asyncio
async def test_missing_messages_is_400(server: FakeAnthropicServer, client: AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as info:
        await client.post("/v1/messages", body={"model": MODEL, "max_tokens": 16}, cast_to=object)
    assert info.value.type == "invalid_request_error"
    assert "messages" in (info.value.api_message or "")
    status, payload = raw_post(
        f"{server.base_url}/v1/messages",
        {"model": MODEL, "max_tokens": 16, "messages": []},
        {"x-api-key": "k"},
    )
    assert status == 400 and payload["error"]["type"] == "invalid_request_error"


@pytest.mark.asyncio
async def test_client_timeout(server: FakeAnthropicServer) -> None:
    server.enqueue(FakeReply(text="too late", delay=1.0))
    async with AsyncAnthropic(
        api_key="test-key", base_url=server.base_url, timeout=0.2, max_retries=0
    ) as slow_client:
        with pytest.raises(anthropic.APITimeoutError):
            await slow_client.messages.create(model=MODEL, max_tokens=16, messages=USER)
    # The server survived the disconnect and keeps serving.
    server.enqueue(FakeReply(text="still alive"))
    status, payload = raw_post(
        f"{server.base_url}/v1/messages",
        {"model": MODEL, "max_tokens": 16, "messages": USER},
        {"x-api-key": "k"},
    )
    assert status == 200 and payload["content"][0]["text"] == "still alive"


@pytest.mark.asyncio
async def test_latency_applies_to_every_reply(server: FakeAnthropicServer, client: AsyncAnthropic) -> None:
    server.latency = 0.15
    server.enqueue(FakeReply(text="slow", delay=0.05))
    await client.messages.create(model=MODEL, max_tokens=16, messages=USER)
    await client.messages.create(model=MODEL, max_tokens=16, messages=USER)
    assert [r["waited"] for r in server.requests] == [pytest.approx(0.2), pytest.approx(0.15)]


@pytest.mark.asyncio
async def test_requests_are_recorded(server: FakeAnthropicServer, client: AsyncAnthropic) -> None:
    await client.messages.create(
        model=MODEL, max_tokens=32, messages=USER, system="Be brief.", extra_body={"temperature": 0.2}
    )
    (recorded,) = server.requests
    assert recorded["method"] == "POST" and recorded["path"] == "/v1/messages"
    headers = recorded["headers"]  # SDK 2.x authenticates with a bearer token
    assert headers.get("x-api-key") == "test-key" or headers.get("authorization") == "Bearer test-key"
    assert "anthropic-version" in recorded["headers"]
    assert recorded["body"]["system"] == "Be brief." and recorded["body"]["temperature"] == 0.2
    server.reset()
    assert server.requests == [] and server.latency == 0


@pytest.mark.asyncio
async def test_default_echo_reply(client: AsyncAnthropic) -> None:
    message: Any = await client.messages.create(model=MODEL, max_tokens=16, messages=USER)
    assert message.content[0].text == "Echo: What is the weather in Paris?"
    history: Any = [
        *USER,
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "w", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "21C"}]},
    ]
    message = await client.messages.create(model=MODEL, max_tokens=16, messages=history)
    assert message.content[0].text == "Echo: Tool result: 21C"


def test_sync_client_and_separate_server() -> None:
    with FakeAnthropicServer(latency=0.0) as srv:
        sync_client = anthropic.Anthropic(api_key="k", base_url=srv.base_url)
        srv.enqueue(FakeReply(text="sync ok", stop_reason="max_tokens"))
        message: Any = sync_client.messages.create(model=MODEL, max_tokens=4, messages=USER)
        assert message.content[0].text == "sync ok" and message.stop_reason == "max_tokens"
        sync_client.close()
    with pytest.raises(RuntimeError):
        _ = srv.base_url


@pytest.mark.asyncio
async def test_responder_scripts_a_reply_from_the_request_when_the_queue_is_empty(
    server: FakeAnthropicServer, client: AsyncAnthropic
) -> None:
    seen: list[str] = []

    def responder(body: dict) -> FakeReply | None:
        text = body["messages"][-1]["content"]
        seen.append(text)
        return FakeReply(text=f"scripted for {text}") if "Paris" in text else None

    server.responder = responder
    server.enqueue(FakeReply(text="queued first"))

    queued = await client.messages.create(model=MODEL, max_tokens=50, messages=USER)
    scripted = await client.messages.create(model=MODEL, max_tokens=50, messages=USER)
    echoed = await client.messages.create(
        model=MODEL, max_tokens=50, messages=[{"role": "user", "content": "And in Rome?"}]
    )

    assert [m.content[0].text for m in (queued, scripted, echoed)] == [  # type: ignore[union-attr]
        "queued first",
        "scripted for What is the weather in Paris?",
        "Echo: And in Rome?",
    ]
    assert seen == ["What is the weather in Paris?", "And in Rome?"]  # not asked while the queue had a reply
    server.reset()
    assert server.responder is None


# --- the standalone server's command line (bench/stack.py starts it this way) ----------------------


def _standalone(*extra: str) -> tuple[subprocess.Popen[str], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "-m", "agentflow.testing.fake_anthropic", "--port", str(port), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, f"http://127.0.0.1:{port}"


def test_the_command_line_streams_a_word_every_chunk_delay() -> None:
    """``--chunk-delay``: a streamed reply's words come that far apart, as a model writes them
    (``bench/production_load.py --llm-chunk-delay``); without it, all at once."""
    proc, base_url = _standalone("--chunk-delay", "0.1")
    try:
        assert proc.stdout is not None
        assert "listening" in proc.stdout.readline()
        sync_client = anthropic.Anthropic(api_key="k", base_url=base_url, max_retries=0)
        arrivals = []
        with sync_client.messages.stream(model=MODEL, max_tokens=16, messages=USER) as stream:
            for _ in stream.text_stream:
                arrivals.append(time.monotonic())
        sync_client.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)

    assert len(arrivals) == 7  # "Echo: What is the weather in Paris?", a word a piece
    assert arrivals[-1] - arrivals[0] >= 0.5  # six gaps of 0.1 s, less the timer's slack


def test_the_command_line_refuses_a_negative_chunk_delay() -> None:
    proc, _ = _standalone("--chunk-delay", "-0.5")
    _, err = proc.communicate(timeout=30)

    assert proc.returncode == 2
    assert "--chunk-delay must be 0 or more seconds; got -0.5" in err
