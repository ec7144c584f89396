"""The Celery worker's warm-up (``conversations.tasks._warm_up``, on ``worker_ready``)."""

from __future__ import annotations

import gc
import weakref

import pytest

from conversations.tasks import _warm_up


class _Node:
    me: _Node


@pytest.mark.django_db
def test_the_warm_up_freezes_what_the_worker_loaded_and_later_garbage_is_still_collected() -> None:
    gc.unfreeze()
    try:
        _warm_up()
        frozen = gc.get_freeze_count()
        node = _Node()
        node.me = node  # a cycle: only the collector frees it
        gone = weakref.ref(node)
        del node
        gc.collect()
    finally:
        gc.unfreeze()
    assert frozen > 10_000  # Django, the models, the agent: out of every full collection's walk
    assert gone() is None
