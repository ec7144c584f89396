"""The chit-chat benches' candidate inputs (``bench/chitchat_cv.py --similarity prev`` and
``bench/chitchat_candidates.py``): what each input reads off the message and the thread it is put to."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from conversations.thread_features import ThreadState

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

# bench/ is not a package: found through sys.path; the benches' environment defaults stay in the module
with mock.patch.dict(os.environ):
    import chitchat_candidates
    import chitchat_cv


def _state(last: np.ndarray) -> ThreadState:
    rng = np.random.default_rng(3)
    opening = rng.normal(size=384).astype(np.float32)
    return ThreadState(opening, last, opening + last, {"cats", "hats"})


def test_prev_is_the_last_turns_unit_embedding_whatever_the_message() -> None:
    last = np.zeros(384, dtype=np.float32)
    last[:2] = (3.0, 4.0)
    message = np.random.default_rng(1).normal(size=384).astype(np.float32)

    raw = chitchat_cv.similarity_raw(("prev",), message, _state(last))

    assert raw.shape == (384,)
    assert raw[:2].tolist() == pytest.approx([0.6, 0.8])
    assert not raw[2:].any()
    # after the other kinds, in the order asked
    both = chitchat_cv.similarity_raw(("last", "prev"), message, _state(last))
    assert np.array_equal(both[384:], raw)


@pytest.mark.parametrize(
    ("text", "on", "off"),
    [
        ("so do you have any musical preferences ?", {0, 1, 4}, {2, 3}),
        ("anyway , what do you do for a living ?", {0, 1, 4}, {3}),
        ("hi , how are you doing today ?", {2}, {0, 3, 4}),
        ("i have to go now , nice talking to you", {3}, {0, 1, 2, 4}),
        ("i work for a watch dealer . where do you work ?", {6, 10}, {0, 3}),
        ("that is a lot of hats lol", set(), {0, 1, 2, 3, 4, 6, 10}),
    ],
)
def test_candidate_cues_read_open_talk(text: str, on: set[int], off: set[int]) -> None:
    last = np.random.default_rng(2).normal(size=384).astype(np.float32)
    row = chitchat_candidates.extra(text, np.ones(384, dtype=np.float32) / 20, _state(last))

    assert row.shape == (chitchat_candidates.N_EXTRA + 384,)
    for index in on:
        assert row[index] > 0, (text, index, row[: chitchat_candidates.N_EXTRA].tolist())
    for index in off:
        assert row[index] == 0, (text, index, row[: chitchat_candidates.N_EXTRA].tolist())
    assert float(np.linalg.norm(row[chitchat_candidates.N_EXTRA :])) == pytest.approx(1.0, abs=1e-5)
