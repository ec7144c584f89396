"""The thread decision gives the same verdicts and probabilities as before its CPU was cut (issue 13).

tests/conversations/data/thread_decisions.{json,npz}: 121 decisions of whole conversations from the
support chats and SGD dev, as the pipeline called ``decide_thread`` (the candidate threads' states, the
clock, the vectors of the reply ends the second stage embedded; vectors as float16), chosen so that every
reason a decision gives, every veto of a resolution and both readings of the second stage (its P, the
gate's bound) show up; with the outputs the code gave on exactly these inputs before the change
(``bench/decision_replay.py fixture``). Each decision's event, thread, confidence and signals must be
equal, and the scorer's P(new topic) and P(resolution) and the second stage's P within 1e-6: the
fixture was recorded on an AVX2 machine, and NumPy's float32 kernels sum in another order with AVX-512
(seen: 2.7e-8 apart on an Intel Xeon for the same inputs and code), so the bound is float32's, not
bit-identity. A change of the decision's logic moves these by far more."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conversations.thread_detection import Candidate, decide_thread, shift_stage, shift_stage_features
from conversations.thread_features import ThreadState, load_model

#: float32 arithmetic across CPUs (see the module's docstring), not a change of logic.
TOLERANCE = 1e-6
DATA = Path(__file__).resolve().parent / "data" / "thread_decisions"
ROWS = json.loads(DATA.with_suffix(".json").read_text())
with np.load(DATA.with_suffix(".npz")) as stored:
    VECTORS = stored["vectors"].astype(np.float32)


def _candidate(c: dict[str, Any]) -> Candidate:
    state = ThreadState(
        VECTORS[c["opening"]],
        VECTORS[c["last_user"]],
        VECTORS[c["centroid"]],
        set(c["vocabulary"]),
        c["last_assistant_text"],
        c["user_turns"],
    )
    return Candidate(
        c["thread_id"],
        state,
        datetime.fromisoformat(c["last_activity_at"]),
        resolved=c["resolved"],
        current_session=c["current_session"],
    )


def _probabilities(row: dict[str, Any], candidates: list[Candidate]) -> list[Any]:
    """P(new topic), P(resolution) against the active thread, then each embedded reply end and the
    second stage's P with it (as the decision computes them)."""
    if not candidates:
        return []
    model, state, embedding = load_model("task"), candidates[0].state, VECTORS[row["embedding"]]
    p_new, p_res = model.score(model.features(row["text"], embedding, state))
    found: list[Any] = [float(p_new), float(p_res)]
    for tail, index in (row["replies"] or {}).items():
        x = shift_stage_features(row["text"], embedding, state, p_new, VECTORS[index])
        found += [tail, shift_stage().probability(x)]
    return found


@pytest.mark.parametrize("index", range(len(ROWS)))
def test_decision_as_before(index: int) -> None:
    row = ROWS[index]
    candidates = [_candidate(c) for c in row["candidates"]]
    replies = {tail: VECTORS[i] for tail, i in (row["replies"] or {}).items()}
    decision = decide_thread(
        text=row["text"],
        embedding=VECTORS[row["embedding"]],
        candidates=candidates,
        now=datetime.fromisoformat(row["now"]),
        inactivity=timedelta(seconds=row["inactivity_seconds"]),
        model=load_model("task"),
        embed_reply=replies.__getitem__ if row["replies"] is not None else None,
        stage_margin=row["stage_margin"],
    )
    expected = row["expected"]
    assert (decision.event, decision.thread_id, decision.confidence) == (
        expected["event"],
        expected["thread_id"],
        expected["confidence"],
    )
    assert json.loads(json.dumps(decision.signals, default=float)) == expected["signals"]
    found = _probabilities(row, candidates)
    assert len(found) == len(expected["probabilities"])
    for value, reference in zip(found, expected["probabilities"], strict=True):
        if isinstance(reference, str):
            assert value == reference
        else:
            assert abs(value - reference) <= TOLERANCE


def test_the_set_covers_every_reason() -> None:
    """Every way ``decide_thread`` places a message is in the set (so the comparison above reads them all)."""
    reasons = {str(row["expected"]["signals"].get("reason", "")).split(";")[0] for row in ROWS}
    vetoes = {row["expected"]["signals"].get("resolution_vetoed") for row in ROWS} - {None}
    assert len(reasons) == 22
    assert len(vetoes) == 6
    assert any("p_shift_stage" in row["expected"]["signals"] for row in ROWS)
    assert any("p_shift_stage_max" in row["expected"]["signals"] for row in ROWS)
