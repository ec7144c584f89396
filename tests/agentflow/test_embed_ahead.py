"""An in-process turn embeds its message on another thread while the message is stored
(``pipeline.embedding_ahead``), and places the message with the vector of the text it stored."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence

import numpy as np
import pytest

from agentflow import AgentFrameworkBuilder, pipeline
from agentflow.embeddings import Embedder, get_embedder
from agentflow.errors import InvalidInput
from conversations.models import Message, Thread

pytestmark = pytest.mark.django_db(transaction=True)


class RecordingEmbedder(Embedder):
    """The real default encoder, noting each text it embeds and the thread that asked."""

    def __init__(self) -> None:
        self.inner = get_embedder()
        self.dimensions = self.inner.dimensions
        self.calls: list[tuple[str, str]] = []
        self.release = threading.Event()
        self.release.set()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        for text in texts:
            self.calls.append((text, threading.current_thread().name))
        assert self.release.wait(timeout=10)
        return self.inner.embed(texts)


def _agent(embedder: Embedder):  # type: ignore[no-untyped-def]
    agent = AgentFrameworkBuilder().build_sync(None)
    agent.embedder = embedder
    return agent


def _placed_vector(message: Message) -> np.ndarray:
    thread = Thread.objects.get(pk=message.thread_id)
    return np.asarray(thread.opening_embedding, dtype=np.float32)


def test_the_message_is_embedded_on_the_ahead_thread_and_placed_with_that_vector() -> None:
    embedder = RecordingEmbedder()
    agent = _agent(embedder)

    received, prepared = pipeline.accept_and_prepare(
        agent, user_id="ahead-1", message="  My router keeps dropping wifi\x07 ", embed_ahead=True
    )

    stored = Message.objects.get(pk=received.message.pk)
    assert stored.content == "My router keeps dropping wifi"
    assert prepared is not None and prepared.ctx is not None
    # One embedding of the stored text, and not on the thread that stored the message.
    assert [text for text, _ in embedder.calls] == ["My router keeps dropping wifi"]
    assert embedder.calls[0][1].startswith("agentflow-embed")
    expected = get_embedder().embed_one("My router keeps dropping wifi")
    assert float(np.dot(_placed_vector(stored), expected)) > 0.999


def test_a_busy_ahead_thread_leaves_the_embedding_to_the_turn() -> None:
    embedder = RecordingEmbedder()
    agent = _agent(embedder)
    embedder.release.clear()  # the first message's embedding holds the ahead thread
    first = pipeline.embedding_ahead(agent, "a message that holds the thread")
    assert first is not None
    try:
        assert pipeline.embedding_ahead(agent, "another message") is None
    finally:
        embedder.release.set()
    first.vector.result(timeout=10)

    embedder.calls.clear()
    received, _ = pipeline.accept_and_prepare(
        agent, user_id="ahead-2", message="Where is my parcel?", embed_ahead=True
    )
    assert Message.objects.get(pk=received.message.pk).thread_id is not None
    assert [text for text, _ in embedder.calls] == ["Where is my parcel?"]


def test_a_message_accept_refuses_is_not_embedded_and_nothing_is_stored() -> None:
    embedder = RecordingEmbedder()
    agent = _agent(embedder)
    limit = agent.config.input_config.max_message_chars

    for bad in ("   ", "x" * (limit + 1), 42):
        assert pipeline.embedding_ahead(agent, bad) is None
        with pytest.raises(InvalidInput):
            pipeline.accept_and_prepare(agent, user_id="ahead-3", message=bad, embed_ahead=True)  # type: ignore[arg-type]
    assert embedder.calls == []
    assert not Message.objects.filter(user__external_id="ahead-3").exists()


def test_a_resend_with_other_text_is_placed_by_the_stored_text() -> None:
    """The same client_message_id with other text: the stored message is the first one, and the
    vector begun for the new text is not used for it."""
    embedder = RecordingEmbedder()
    agent = _agent(embedder)
    first, _ = pipeline.accept_and_prepare(
        agent, user_id="ahead-4", message="My invoice is wrong", client_message_id="c-1", embed_ahead=True
    )
    Message.objects.filter(pk=first.message.pk).update(status=Message.Status.PENDING, thread=None)
    Thread.objects.filter(user__external_id="ahead-4").delete()
    embedder.calls.clear()

    again, prepared = pipeline.accept_and_prepare(
        agent, user_id="ahead-4", message="Something else entirely", client_message_id="c-1", embed_ahead=True
    )

    assert again.message.pk == first.message.pk and not again.created
    assert prepared is not None
    texts = [text for text, _ in embedder.calls]
    assert texts == ["Something else entirely", "My invoice is wrong"]
    expected = get_embedder().embed_one("My invoice is wrong")
    stored = Message.objects.get(pk=first.message.pk)
    assert float(np.dot(_placed_vector(stored), expected)) > 0.999


async def test_only_a_lone_in_process_turn_embeds_ahead() -> None:
    """``process_message`` alone embeds ahead; two turns at once each embed on their own thread
    but the first (with other turns running, a second thread only adds hand-offs)."""
    embedder = RecordingEmbedder()
    agent = await AgentFrameworkBuilder().build(None)
    agent.embedder = embedder

    await agent.process_message(user_id="ahead-5", message="My router keeps dropping wifi")
    assert [thread.startswith("agentflow-embed") for _, thread in embedder.calls] == [True]

    embedder.calls.clear()
    await asyncio.gather(
        agent.process_message(user_id="ahead-6", message="Where is my parcel?"),
        agent.process_message(user_id="ahead-7", message="My invoice is wrong"),
    )
    placements = {
        text: thread
        for text, thread in embedder.calls
        if text in ("Where is my parcel?", "My invoice is wrong")
    }
    assert placements["Where is my parcel?"].startswith("agentflow-embed")
    assert not placements["My invoice is wrong"].startswith("agentflow-embed")


class FailingEmbedder(RecordingEmbedder):
    """An encoder that fails (a missing or corrupt model file), as a turn's own embedding would."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        super().embed(texts)
        raise RuntimeError("the encoder failed")


def test_an_encoder_failure_on_the_ahead_thread_fails_the_turn_as_it_would_inline_and_frees_the_thread() -> (
    None
):
    agent = _agent(FailingEmbedder())

    with pytest.raises(RuntimeError, match="the encoder failed"):
        pipeline.accept_and_prepare(
            agent, user_id="ahead-8", message="My card was declined", embed_ahead=True
        )

    stored = Message.objects.get(user__external_id="ahead-8")
    assert stored.content == "My card was declined" and stored.thread_id is None  # kept, not placed
    healthy = RecordingEmbedder()
    later = pipeline.embedding_ahead(_agent(healthy), "the next message")
    assert later is not None  # the ahead thread is free again
    later.vector.result(timeout=10)
    assert healthy.calls[0][1].startswith("agentflow-embed")
