"""``bench/train_shift_stage.py``: the sets it fits on, its folds of whole domains and their summary, and
the support-chat files written in other styles (bench/data/support_fresh5.jsonl, the blind set, and
support_styles.jsonl, tuning data)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from conversations import thread_detection

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

# bench/ is not a package: found through sys.path; the trainer's environment defaults stay in the module
with mock.patch.dict(os.environ):
    import train_shift_stage
    from support_data import load_support_holdout

DATA = ROOT / "bench" / "data"
LABELS = {"FIRST", "FOLLOW_UP", "NEW_TOPIC", "RESOLUTION", "RETURN"}


def test_a_domain_always_falls_in_the_same_fold_and_the_folds_are_all_used() -> None:
    domains = [f"domain-{i}" for i in range(200)]

    folds = [train_shift_stage.domain_fold(d) for d in domains]

    assert folds == [train_shift_stage.domain_fold(d) for d in domains]
    assert set(folds) == set(range(train_shift_stage.FOLDS))
    assert train_shift_stage.domain_fold("printers") == train_shift_stage.domain_fold("printers")


def test_the_fold_summary_gives_mean_spread_and_worst_of_the_net_per_100_rows() -> None:
    # fold 0: 4 rows, 2 shifts flipped, 1 other flipped -> +25; fold 1: 2 rows, nothing flipped -> 0
    y = np.asarray([1, 1, 0, 0, 1, 0])
    flip = np.asarray([True, True, True, False, False, False])
    fold_of = np.asarray([0, 0, 0, 0, 1, 1])

    summary = train_shift_stage.fold_summary(flip, y, fold_of)

    assert summary == "mean +12.5 spread 12.5 worst +0.0 (+2 / -1)"


def test_a_fold_with_no_rows_is_left_out_of_the_summary() -> None:
    y = np.asarray([1, 0])
    flip = np.asarray([False, True])

    assert train_shift_stage.fold_summary(flip, y, np.asarray([3, 3])) == (
        "mean -50.0 spread 0.0 worst -50.0 (+0 / -1)"
    )


def test_the_stored_stage_is_compared_only_when_fitted_on_the_features_computed_now(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.setattr(thread_detection, "_shift_stage", None)
    (weights, _bias, mean, scale), threshold = train_shift_stage.stored_stage()
    assert len(weights) == len(mean) == len(scale) == len(thread_detection.SHIFT_STAGE_FEATURES)
    assert threshold == thread_detection.shift_stage().threshold

    data = json.loads(thread_detection.SHIFT_STAGE_PATH.read_text())
    data["features"] = [*data["features"], "sim_last"]
    path = tmp_path / "shift_stage.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(thread_detection, "SHIFT_STAGE_PATH", path)
    monkeypatch.setattr(thread_detection, "_shift_stage", None)

    assert train_shift_stage.stored_stage() is None


def test_the_trainer_fits_on_fresh4_and_the_styles_set_and_never_on_the_blind_fresh5(tmp_path) -> None:
    sgd = {"dialogue_id": "sgd-1", "services": ["Hotels_1"], "turns": []}
    (tmp_path / "sgd_threads").mkdir()
    (tmp_path / "sgd_threads" / "dev.jsonl").write_text(json.dumps(sgd) + "\n")

    sets = train_shift_stage.load_sets(tmp_path)

    assert {name: last_only for name, (_, last_only) in sets.items()} == {
        "support_turns tune": False,
        "support_unmarked2 tune": True,
        "support_fresh3": True,
        "support_fresh4": True,
        "support_styles": False,
        "SGD dev": False,
    }
    ids = {d["dialogue_id"] for dialogues, _ in sets.values() for d in dialogues}
    fresh5 = {d["dialogue_id"] for d in load_support_holdout(DATA / "support_fresh5.jsonl", any_split=True)}
    assert not ids & fresh5
    assert len(sets["support_styles"][0]) == 204


def _domains(path: Path) -> set[str]:
    return {json.loads(line)["domain"] for line in path.read_text().splitlines() if line.strip()}


@pytest.mark.parametrize(("name", "chats"), [("support_fresh5", 93), ("support_styles", 204)])
def test_the_styles_files_are_well_formed_and_in_domains_of_their_own(name: str, chats: int) -> None:
    path = DATA / f"{name}.jsonl"
    dialogues = load_support_holdout(path, any_split=True)

    assert len(dialogues) == chats
    for d in dialogues:
        users = [t for t in d["turns"] if t["speaker"] == "USER"]
        assert users[0]["label"] == "FIRST" and {t["label"] for t in users} <= LABELS, d["dialogue_id"]
        assert [t["speaker"] for t in d["turns"]] == ["USER", "SYSTEM"] * (len(users) - 1) + ["USER"]
        opened = 0
        for t in users[1:]:
            if t["label"] == "NEW_TOPIC":
                opened += 1
                assert t["thread"] == opened, d["dialogue_id"]
            elif t["label"] == "RETURN":
                assert t["thread"] < opened, d["dialogue_id"]
        assert users[-1]["kind"], d["dialogue_id"]
    others = set().union(*(_domains(p) for p in DATA.glob("support_*.jsonl") if p != path))
    assert len(_domains(path)) >= 20
    assert not _domains(path) & others
