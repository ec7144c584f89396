"""A preference job run in the turn's process reuses the turn's vector of the message (agentflow.jobs
``handoff``): the memory is the one a fresh embedding writes, and the text is embedded once."""

from __future__ import annotations

import collections
from collections.abc import Sequence

import numpy as np
import pytest
from asgiref.sync import sync_to_async

from agentflow import AgentFrameworkBuilder
from agentflow.embeddings import Embedder, get_embedder
from agentflow.jobs import wait_for_inline_jobs
from memory.models import Memory
from memory.tasks import remember_preference

WHOLE = "I prefer window seats when I travel by train."
LONGER = "The app crashes on start. Please email me, don't call."


class CountingEmbedder(Embedder):
    """The test suite's sentence encoder (no text cache), counting each text it embeds."""

    dimensions = 384
    embedded: collections.Counter[str] = collections.Counter()

    model_id = "all-MiniLM-L6-v2-onnx-int8"  # the inner embedder's (a vector space of its own)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        self.embedded.update(texts)
        # got at the first call: get_embedder holds its lock while it builds this one
        return get_embedder("minilm-fp32").embed(texts)


def fresh(text: str) -> np.ndarray:
    return get_embedder("minilm-fp32").embed([text])[0]


@pytest.fixture
def counting(settings):
    settings.AGENTFLOW = {
        **settings.AGENTFLOW,
        "BACKGROUND_JOBS": True,
        "EMBEDDER": f"{__name__}.CountingEmbedder",
    }
    CountingEmbedder.embedded.clear()
    return CountingEmbedder.embedded


async def _turn(message: str) -> dict:
    agent = await AgentFrameworkBuilder().with_intent_categories([]).build(None)
    result = await agent.process_message(user_id="pref", message=message)
    await sync_to_async(wait_for_inline_jobs)(timeout=30)
    return result


@pytest.mark.django_db(transaction=True)
async def test_a_whole_message_preference_takes_the_turns_vector(counting) -> None:
    await _turn(WHOLE)

    memory = await Memory.objects.aget(user__external_id="pref")
    assert (memory.kind, memory.content) == ("preference", WHOLE)
    assert np.array_equal(np.asarray(memory.embedding, dtype=np.float32), fresh(WHOLE))
    assert counting[WHOLE] == 1  # the turn's embedding only: the job did not embed it again


@pytest.mark.django_db(transaction=True)
async def test_a_preference_inside_a_longer_message_is_embedded_itself(counting) -> None:
    await _turn(LONGER)

    memory = await Memory.objects.aget(user__external_id="pref")
    assert memory.content == "Please email me, don't call."
    assert np.array_equal(np.asarray(memory.embedding, dtype=np.float32), fresh(memory.content))
    assert (counting[LONGER], counting[memory.content]) == (1, 1)


@pytest.mark.django_db(transaction=True)
async def test_the_job_run_again_as_a_worker_would_updates_the_same_memory(counting) -> None:
    result = await _turn(WHOLE)
    first = await Memory.objects.aget(user__external_id="pref")

    # A retry on a worker: no hand-off there, so the statement is embedded, to the same vector.
    assert await sync_to_async(remember_preference)(result["message_id"]) == "remembered"

    again = await Memory.objects.aget(user__external_id="pref")
    assert again.pk == first.pk
    assert np.array_equal(np.asarray(again.embedding), np.asarray(first.embedding))
    assert again.source["merged"] == [{"message": result["message_id"], "by": "user statement"}]
    assert counting[WHOLE] == 2
