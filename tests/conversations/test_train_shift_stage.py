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
        "support_check_unmarked": True,
        "support_fresh6": False,
        "SGD dev": False,
    }
    ids = {d["dialogue_id"] for dialogues, _ in sets.values() for d in dialogues}
    fresh5 = {d["dialogue_id"] for d in load_support_holdout(DATA / "support_fresh5.jsonl", any_split=True)}
    assert not ids & fresh5
    assert len(sets["support_styles"][0]) == 204


def _domains(path: Path) -> set[str]:
    return {json.loads(line)["domain"] for line in path.read_text().splitlines() if line.strip()}


@pytest.mark.parametrize(
    ("name", "chats"), [("support_fresh5", 93), ("support_styles", 204), ("support_fresh6", 108)]
)
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


def _chat(dialogue_id: str, domain: str, opening: str) -> dict:
    return {
        "dialogue_id": dialogue_id,
        "domain": domain,
        "turns": [
            {"speaker": "USER", "utterance": opening, "label": "FIRST"},
            {"speaker": "SYSTEM", "utterance": f"reply to {opening}", "label": None},
            {"speaker": "USER", "utterance": "thanks", "label": "RESOLUTION"},
        ],
    }


def test_grafts_put_another_opening_of_the_same_business_after_a_first_exchange() -> None:
    """Same domain only, never from SGD, a donor telling the host's problem again (cosine >= 0.6) skipped,
    ``per_host`` donors per chat; the host's first exchange kept, the opening labelled a new topic."""
    axis = np.eye(4)
    vectors = {
        "wash charged twice": axis[0],
        "the wash charged me twice": (axis[0] + 0.1 * axis[1]) / np.linalg.norm(axis[0] + 0.1 * axis[1]),
        "do you have a monthly plan": axis[1],
        "my cinema ticket failed": axis[2],
        "sgd opening": axis[3],
    }
    sets = {
        "a": (
            [_chat("w1", "car-wash", "wash charged twice"), _chat("c1", "cinema", "my cinema ticket failed")],
            True,
        ),
        "b": (
            [
                _chat("w2", "car-wash", "the wash charged me twice"),
                _chat("w3", "car-wash", "do you have a monthly plan"),
            ],
            False,
        ),
        "SGD dev": ([_chat("s1", "car-wash", "sgd opening")], False),
    }

    grafted = train_shift_stage.grafts(sets, vectors, per_host=5)

    pairs = {(g["turns"][0]["utterance"], g["turns"][2]["utterance"]) for g in grafted}
    assert pairs == {
        ("wash charged twice", "do you have a monthly plan"),
        ("the wash charged me twice", "do you have a monthly plan"),
        ("do you have a monthly plan", "wash charged twice"),
        ("do you have a monthly plan", "the wash charged me twice"),
    }
    assert all(g["domain"] == "car-wash" and g["turns"][2]["label"] == "NEW_TOPIC" for g in grafted)
    assert all(g["turns"][1]["utterance"] == f"reply to {g['turns'][0]['utterance']}" for g in grafted)
    assert len(train_shift_stage.grafts(sets, vectors, per_host=1)) == 3


def test_grafted_rows_train_only_outside_the_held_out_domains() -> None:
    real = [
        {"x": [0.0], "gold": "FOLLOW_UP", "domain": "a"},
        {"x": [1.0], "gold": "NEW_TOPIC", "domain": "b"},
    ]
    grafted = [
        {"x": [5.0], "gold": "NEW_TOPIC", "domain": "a"},
        {"x": [6.0], "gold": "NEW_TOPIC", "domain": "b"},
    ]
    rows = train_shift_stage.Rows(real, grafted, 0.1)
    seen: list[tuple[list[float], list[float]]] = []

    def fit(x, y, l2, sample_weight=None):
        seen.append((x[:, 0].tolist(), sample_weight.tolist()))

    with mock.patch.object(train_shift_stage, "fit", fit):
        rows.fit_without({"a"}, 0.1)
        rows.fit_without(set(), 0.1)

    assert seen == [([1.0, 6.0], [1.0, 0.1]), ([0.0, 1.0, 5.0, 6.0], [1.0, 1.0, 0.1, 0.1])]
    assert rows.y.tolist() == [0.0, 1.0] and len(rows.xg) == 2
