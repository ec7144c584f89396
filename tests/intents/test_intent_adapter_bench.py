"""``bench/intent_adapter.py``: the adapter's written-out gradient, its training, and the checks it runs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.intents.test_intent_eval_folds import ROOT, write_sgd, write_train

sys.path.insert(0, str(ROOT / "bench"))

import intent_adapter  # bench/ is not a package: found through sys.path


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=-1, keepdims=True)


def test_the_episode_gradient_matches_finite_differences():
    rng = np.random.default_rng(1)
    d, ways, k, m = 6, 3, 4, 7
    shots = _unit(rng.normal(size=(ways, k, d)))
    queries = _unit(rng.normal(size=(m, d)))
    labels = rng.integers(0, ways, m)
    w = np.eye(d) + 0.3 * rng.normal(size=(d, d))

    _, grad = intent_adapter._episode(w, shots, queries, labels, 5.0)

    numeric = np.zeros_like(w)
    for i in range(d):
        for j in range(d):
            step = np.zeros_like(w)
            step[i, j] = 1e-6
            plus = intent_adapter._episode(w + step, shots, queries, labels, 5.0)[0]
            minus = intent_adapter._episode(w - step, shots, queries, labels, 5.0)[0]
            numeric[i, j] = (plus - minus) / 2e-6
    assert np.abs(grad).max() > 0.1
    np.testing.assert_allclose(grad, numeric, atol=1e-7)


def _synthetic(rng: np.random.Generator, per_intent: int) -> dict[str, np.ndarray]:
    """Eight intents told apart by two weak dimensions, drowned in noise on six others."""
    by_intent = {}
    for index in range(8):
        centre = np.zeros(8)
        centre[0], centre[1] = np.cos(index * np.pi / 4), np.sin(index * np.pi / 4)
        by_intent[f"intent{index}"] = _unit(
            0.3 * centre + rng.normal(0, 0.3, (per_intent, 8)) * (np.arange(8) >= 2)
        )
    return by_intent


def _prototype_accuracy(w: np.ndarray, by_intent: dict[str, np.ndarray]) -> float:
    names = sorted(by_intent)
    adapted = {n: _unit(by_intent[n] @ w.T) for n in names}
    protos = _unit(np.stack([adapted[n][:5].mean(axis=0) for n in names]))
    hits = [np.argmax(protos @ v) == i for i, n in enumerate(names) for v in adapted[n][5:]]
    return float(np.mean(hits))


@pytest.mark.parametrize("rank", [0, 2])
def test_training_learns_the_informative_directions_and_decay_holds_it_at_the_identity(rank):
    rng = np.random.default_rng(7)
    train, held = _synthetic(rng, 40), _synthetic(rng, 40)
    settings = dict(ways=6, shots=5, queries_per=5, temperature=0.1, learning_rate=0.01, seed=0)

    w = intent_adapter.train_adapter(train, rank=rank, decay=1e-4, steps=300, **settings)
    again = intent_adapter.train_adapter(train, rank=rank, decay=1e-4, steps=300, **settings)
    held_back = intent_adapter.train_adapter(train, rank=rank, decay=100.0, steps=300, **settings)

    np.testing.assert_array_equal(w, again)  # seeded: the same matrix every time
    identity = _prototype_accuracy(np.eye(8), held)
    assert identity < 0.6
    assert _prototype_accuracy(w, held) > identity + 0.2
    assert np.abs(held_back - np.eye(8)).max() < 0.02


def test_training_refuses_fewer_than_two_intents():
    with pytest.raises(SystemExit, match="fewer than 2 intents with 3 rows"):
        intent_adapter.train_adapter(
            {"one": np.eye(4)[:3], "thin": np.eye(4)[:2]},
            rank=0,
            decay=0.1,
            steps=1,
            ways=2,
            shots=1,
            queries_per=1,
            temperature=0.05,
            learning_rate=1e-3,
            seed=0,
        )


def _adapter_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "intent_adapter.py"), *args],
        capture_output=True,
        text=True,
        env={**os.environ, "DJANGO_SETTINGS_MODULE": "agentflow_project.settings"},
        cwd=ROOT,
        timeout=600,
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--groups", "1"), "--groups and --ways must be at least 2"),
        (("--steps", "0"), "must be at least 1"),
        (("--temperature", "0"), "--temperature and --learning-rate above 0"),
        (("--decay", "-1"), "--rank and --decay must be at least 0"),
    ],
)
def test_the_bench_refuses_bad_settings(args, message):
    run = _adapter_bench(*args)
    assert run.returncode == 2 and message in run.stderr, run.stderr


def test_the_checks_compare_the_adapter_with_the_identity_on_the_same_folds(tmp_path: Path):
    write_train(tmp_path)  # 5 BANKING77-like intents, 8 rows each
    write_sgd(tmp_path)  # 4 SGD intents with enough turns, and a chit-chat opening

    run = _adapter_bench(
        "--datasets",
        str(tmp_path),
        *"--groups 2 --seeds 2 --sgd-seeds 2 --sizes 5 --shots 3 --queries 4 --steps 20".split(),
        *"--ways 3 --train-shots 3 --queries-per 2".split(),
    )

    assert run.returncode == 0, run.stderr
    out = run.stdout
    # The intents are cut into two groups; each group's adapter never sees the group's own rows.
    assert "group 0: train on 2 intents, evaluate on 3 unseen" in out
    assert "group 1: train on 3 intents, evaluate on 2 unseen" in out
    assert "held-out BANKING77 intent groups (all 2): 4 folds" in out
    assert "banking -> SGD proxy: 2 folds" in out
    assert "SGD -> BANKING77 folds: 2 folds" in out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["identity"], ["adapter"])]
    assert len(rows) == 2 * (2 + 1 + 1 + 1)  # each group, the groups together, and the two domain checks
    for row in rows:
        figures = [float(part.lstrip("±")) for part in row if part.lstrip("±")[:1].isdigit()]
        assert len(figures) == 8 and all(0.0 <= f <= 1.0 for f in figures), row
