"""A client given at build time serves every event loop: other threads' loops get a copy with their own pool."""

from __future__ import annotations

import asyncio
import threading

import pytest

from agentflow.config import LLMConfig
from agentflow.llm import AnthropicBackend
from agentflow.testing.fake_anthropic import FakeReply, ToolCall


def test_a_given_client_answers_on_another_threads_loop_while_its_own_loop_lives(
    anthropic_client, fake_llm
) -> None:
    backend = AnthropicBackend(anthropic_client)
    config = LLMConfig(model="claude-haiku-5-5", max_retries=0, timeout_seconds=10)
    for n in range(3):
        fake_llm.enqueue(FakeReply(text=f"reply {n}"))
    main_loop = asyncio.new_event_loop()
    other: list[str] = []

    async def ask() -> str:
        reply = await backend.generate(
            system="s", messages=[{"role": "user", "content": "hi"}], config=config
        )
        return reply.text

    def in_thread() -> None:
        loop = asyncio.new_event_loop()
        try:
            other.append(loop.run_until_complete(ask()))
        finally:
            loop.close()

    try:
        first = main_loop.run_until_complete(ask())  # the client's pool now holds a connection of main_loop
        worker = threading.Thread(target=in_thread)
        worker.start()
        worker.join(30)
        last = main_loop.run_until_complete(ask())
    finally:
        main_loop.close()

    assert (first, other, last) == ("reply 0", ["reply 1"], "reply 2")


@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])
def test_a_given_client_answers_again_after_its_first_loop_closed(
    anthropic_client, fake_llm, transport
) -> None:
    """A script that calls ``asyncio.run`` twice with one agent: the given client's pool belonged to the
    first, closed loop, and reusing it failed the second call with "Connection error"."""
    from agentflow.llm import backend_for

    backend = backend_for(anthropic_client) if transport == "aiohttp" else AnthropicBackend(anthropic_client)
    config = LLMConfig(model="claude-haiku-5-5", max_retries=0, timeout_seconds=10)
    fake_llm.enqueue(FakeReply(text="first"))
    fake_llm.enqueue(FakeReply(text="second"))

    async def ask() -> str:
        reply = await backend.generate(
            system="s", messages=[{"role": "user", "content": "hi"}], config=config
        )
        return reply.text

    assert asyncio.run(ask()) == "first"
    assert asyncio.run(ask()) == "second"


def test_a_streamed_reply_builds_no_pydantic_model_class_after_a_garbage_collection(
    anthropic_client, fake_llm, monkeypatch
) -> None:
    """The SDK's ``messages.stream()`` helper evaluated ``ParsedMessage[ResponseFormatT]``, which
    pydantic caches only weakly: a collection between two replies threw it away and the next streamed
    reply built it again. The raw events the backend reads now need no generic model at all."""
    import gc

    from pydantic._internal import _generics

    backend = AnthropicBackend(anthropic_client)
    config = LLMConfig(model="claude-haiku-5-5", max_retries=0, timeout_seconds=10)
    built: list[str] = []
    original = _generics.create_generic_submodel

    def counting(model_name: str, *args, **kwargs):
        built.append(model_name)
        return original(model_name, *args, **kwargs)

    async def stream() -> str:
        pieces: list[str] = []

        async def on_text(text: str) -> None:
            pieces.append(text)

        reply = await backend.generate(
            system="s", messages=[{"role": "user", "content": "hi"}], config=config, on_text=on_text
        )
        assert "".join(pieces) == reply.text
        return reply.text

    loop = asyncio.new_event_loop()
    try:
        fake_llm.enqueue(FakeReply(text="first reply"))
        assert loop.run_until_complete(stream()) == "first reply"
        gc.collect()
        monkeypatch.setattr(_generics, "create_generic_submodel", counting)
        fake_llm.enqueue(FakeReply(text="second reply"))
        assert loop.run_until_complete(stream()) == "second reply"
        loop.run_until_complete(backend.aclose())
    finally:
        loop.close()
    assert built == []


def test_the_llm_clients_of_a_process_share_one_tls_context_that_still_verifies(fake_llm) -> None:
    """One client per event loop (each worker thread's); each loaded the certificate store (~30 ms)."""
    import ssl

    from agentflow.registry import anthropic_client_factory

    clients = [anthropic_client_factory() for _ in range(3)]
    contexts = [client._client._transport.ssl_context for client in clients]
    assert all(context is contexts[0] for context in contexts)
    assert contexts[0].verify_mode == ssl.CERT_REQUIRED and contexts[0].check_hostname
    assert contexts[0].cert_store_stats()["x509_ca"] > 0  # the system's CAs, as the SDK loads them


@pytest.mark.parametrize(
    ("max_tokens", "streamed"),
    [(1024, False), (4096, True)],  # 4,096 tokens might outlast the 60 s read timeout as one response
)
def test_whole_replies_ask_for_the_reply_in_one_response_and_hand_on_text_all_of_it(
    anthropic_client, fake_llm, max_tokens: int, streamed: bool
) -> None:
    from agentflow.llm import whole_replies

    backend = AnthropicBackend(anthropic_client)
    config = LLMConfig(model="claude-haiku-5-5", max_retries=0, timeout_seconds=60, max_tokens=max_tokens)
    pieces: list[str] = []

    async def on_text(text: str) -> None:
        pieces.append(text)

    async def ask() -> str:
        with whole_replies():
            reply = await backend.generate(
                system="s", messages=[{"role": "user", "content": "hi"}], config=config, on_text=on_text
            )
        await backend.aclose()
        return reply.text

    fake_llm.enqueue(FakeReply(text="one two three four five"))
    loop = asyncio.new_event_loop()
    try:
        text = loop.run_until_complete(ask())
    finally:
        loop.close()
    assert text == "one two three four five" == "".join(pieces)
    assert (len(pieces) > 1, fake_llm.requests[0]["body"].get("stream") is True) == (streamed, streamed)


def test_a_default_client_given_to_build_talks_through_aiohttp_with_its_settings(fake_llm) -> None:
    """``AsyncAnthropic()`` with no ``http_client`` is moved to the SDK's aiohttp transport (httpx's
    pool scanned every pooled connection on each request); its key, base URL, headers, retries and
    timeout stay. A client given an ``http_client`` of its owner's is used as it is."""
    import anthropic

    from agentflow.llm import backend_for

    given = anthropic.AsyncAnthropic(
        api_key="test-key",
        base_url=fake_llm.base_url,
        max_retries=1,
        timeout=7.0,
        default_headers={"anthropic-beta": "tools-2099"},
    )
    backend = backend_for(given)
    assert isinstance(backend, AnthropicBackend)
    fake_llm.enqueue(FakeReply(text="over aiohttp"))
    config = LLMConfig(model="claude-haiku-5-5", max_retries=1, timeout_seconds=7)
    loop = asyncio.new_event_loop()
    try:
        client = loop.run_until_complete(_client_of(backend))
        reply = loop.run_until_complete(
            backend.generate(system="s", messages=[{"role": "user", "content": "hi"}], config=config)
        )
        loop.run_until_complete(client.close())  # the copy is the backend's; the given one was never opened
    finally:
        loop.close()
    assert isinstance(client._client, anthropic.DefaultAioHttpClient)
    assert (client.api_key, str(client.base_url).rstrip("/")) == ("test-key", fake_llm.base_url.rstrip("/"))
    assert (client.max_retries, client.timeout) == (1, 7.0)
    assert reply.text == "over aiohttp"
    assert fake_llm.requests[-1]["headers"].get("anthropic-beta") == "tools-2099"

    own = anthropic.DefaultAsyncHttpxClient()
    chosen = anthropic.AsyncAnthropic(api_key="test-key", base_url=fake_llm.base_url, http_client=own)
    kept = backend_for(chosen)
    assert isinstance(kept, AnthropicBackend)
    assert kept._client is chosen and chosen._client is own


async def _client_of(backend: AnthropicBackend):
    return backend.client()


_MIXED_INPUT = {"query": "S3 backups", "filters": {"tags": ["ops", "ünïcode ✓"], "limit": 5}, "exact": False}


@pytest.mark.parametrize(
    "reply",
    [
        FakeReply(text="Hello there, this answer comes in several pieces."),
        FakeReply(tool_calls=[ToolCall("search_docs", _MIXED_INPUT, id="toolu_fixed_1")]),
        FakeReply(
            text="Let me look that up.",
            tool_calls=[
                ToolCall("search_docs", _MIXED_INPUT, id="toolu_fixed_1"),
                ToolCall("no_arguments", {}, id="toolu_fixed_2"),
            ],
        ),
    ],
    ids=["text", "tool_use", "mixed"],
)
def test_a_streamed_reply_equals_the_same_reply_asked_whole_and_builds_no_snapshot_per_event(
    anthropic_client, fake_llm, monkeypatch, reply: FakeReply
) -> None:
    """The stream is put together from the raw events (text pieces joined, a tool call's partial
    JSON parsed at its block's end): the SDK's ``messages.stream()`` helper rebuilt a pydantic
    snapshot of the whole message on every event (``accumulate_event``)."""
    from anthropic.lib.streaming import _messages

    snapshots: list[object] = []
    original = _messages.accumulate_event

    def counting(**kwargs):
        snapshots.append(kwargs["event"])
        return original(**kwargs)

    monkeypatch.setattr(_messages, "accumulate_event", counting)
    backend = AnthropicBackend(anthropic_client)
    config = LLMConfig(model="claude-haiku-5-5", max_retries=0, timeout_seconds=10)
    pieces: list[str] = []

    async def on_text(text: str) -> None:
        pieces.append(text)

    async def ask() -> tuple:
        asked = {"system": "s", "messages": [{"role": "user", "content": "hi"}], "config": config}
        streamed = await backend.generate(**asked, on_text=on_text)
        whole = await backend.generate(**asked)
        await backend.aclose()
        return streamed, whole

    fake_llm.enqueue(reply, reply)
    loop = asyncio.new_event_loop()
    try:
        streamed, whole = loop.run_until_complete(ask())
    finally:
        loop.close()
    bodies = [request["body"] for request in fake_llm.requests]
    assert [body.get("stream") for body in bodies] == [True, None]
    assert snapshots == []
    keep = ("text", "content", "usage", "stop_reason", "model", "tool_calls")
    assert {name: getattr(streamed, name) for name in keep} == {name: getattr(whole, name) for name in keep}
    assert "".join(pieces) == streamed.text
    if reply.text:
        assert len(pieces) > 1  # streamed in pieces, not handed over whole at the end
    if reply.tool_calls:
        assert streamed.tool_calls[0]["input"] == _MIXED_INPUT and streamed.stop_reason == "tool_use"
    assert streamed.usage["output_tokens"] > 1  # message_delta's count, not message_start's placeholder


@pytest.mark.parametrize(
    ("error_type", "transient"), [("overloaded_error", True), ("invalid_request_error", False)]
)
def test_an_error_event_in_the_middle_of_a_stream_is_an_llm_error_transient_as_its_type_says(
    anthropic_client, fake_llm, error_type: str, transient: bool
) -> None:
    """The API may fail a reply it has begun (``overloaded_error`` as an SSE ``error`` event on a
    200 response): the backend raises LLMError after the text so far, transient when the error's
    type is (it was judged by the 200 and an overload midway failed the turn for good)."""
    from agentflow.errors import LLMError

    backend = AnthropicBackend(anthropic_client)
    config = LLMConfig(model="claude-haiku-5-5", max_retries=0, timeout_seconds=10)
    pieces: list[str] = []

    async def on_text(text: str) -> None:
        pieces.append(text)

    async def ask() -> None:
        try:
            await backend.generate(
                system="s", messages=[{"role": "user", "content": "hi"}], config=config, on_text=on_text
            )
        finally:
            await backend.aclose()

    fake_llm.enqueue(FakeReply(text="The first words and then", error_mid_stream=error_type))
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(LLMError, match=error_type) as raised:
            loop.run_until_complete(ask())
    finally:
        loop.close()
    assert pieces == ["The "]
    assert "Anthropic API error" in str(raised.value)
    assert raised.value.transient is transient


def test_a_stream_that_breaks_off_inside_a_tool_calls_input_is_an_incomplete_stream() -> None:
    """The stream ends (cleanly, as a proxy may end it) in the middle of a tool call's JSON: the
    backend says the stream was incomplete (a transient LLMError), not a JSON ValueError."""
    from agentflow.llm import _IncompleteStream, _Reply

    reply = _Reply()
    reply.feed({"type": "message_start", "message": {"model": "m", "stop_reason": None, "usage": {}}})
    reply.feed(
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "name": "lookup"}}
    )
    reply.feed(
        {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "input_json_delta", "partial_json": '{"order": "A1'},
        }
    )

    with pytest.raises(_IncompleteStream, match="tool call 'lookup'"):
        reply.finish()
