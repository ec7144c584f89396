"""The Celery worker's warm-up (``conversations.tasks._warm_up``, on ``worker_ready``)."""

from __future__ import annotations

import gc
import weakref

import pytest

from conversations.tasks import YOUNG_GC_THRESHOLD, _warm_up


class _Node:
    me: _Node


@pytest.mark.django_db
def test_the_warm_up_freezes_what_the_worker_loaded_and_later_garbage_is_still_collected() -> None:
    gc.unfreeze()
    threshold = gc.get_threshold()
    try:
        _warm_up()
        frozen = gc.get_freeze_count()
        raised = gc.get_threshold()
        node = _Node()
        node.me = node  # a cycle: only the collector frees it
        gone = weakref.ref(node)
        del node
        gc.collect()
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)
    assert frozen > 10_000  # Django, the models, the agent: out of every full collection's walk
    assert gone() is None
    # Young collections 30 times rarer than Python's default; the older generations' as they were.
    assert raised == (YOUNG_GC_THRESHOLD, *threshold[1:]) and YOUNG_GC_THRESHOLD > threshold[0]
