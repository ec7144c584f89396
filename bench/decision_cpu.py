"""CPU of one thread decision (``decide_thread`` alone, embeddings precomputed) for two model files.

    python bench/decision_cpu.py --cache /tmp/tiage.npz --old OLD.json [--new NEW.json] [--rounds 4]

Replays TIAGE train through the chitchat profile's bookkeeping (``chitchat_cv.replay``) with each
model in turn, interleaved old / new for ``--rounds`` rounds, and prints p50 / p95 of
``time.process_time`` per decision for each (``--new`` defaults to the shipped file).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from chitchat_cv import replay  # noqa: E402  (sets the path and settings)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument(
        "--cache", type=Path, required=True, help="the texts' embeddings (chitchat_cv.py --cache)"
    )
    parser.add_argument("--old", type=Path, required=True)
    parser.add_argument("--new", type=Path, default=None)
    parser.add_argument("--profile", default="chitchat")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()

    import django

    django.setup()
    from train_thread_model import load

    from conversations.thread_features import MODEL_PATH, load_model

    tiage = load(args.datasets / "tiage_threads" / "train.jsonl")
    with np.load(args.cache) as cached:
        vectors = dict(zip(cached["texts"].tolist(), cached["vectors"], strict=True))
    models = {
        "old": load_model(args.profile, str(args.old)),
        "new": load_model(args.profile, str(args.new or MODEL_PATH)),
    }
    timings: dict[str, list[float]] = {"old": [], "new": []}
    for _ in range(args.rounds):
        for name, model in models.items():
            replay(tiage, vectors, model, timings=timings[name])
    for name, values in timings.items():
        ms = np.asarray(values) * 1000
        print(
            f"{name} ({models[name].version}, {models[name].feature_set}): {len(ms)} decisions,"
            f" p50 {np.percentile(ms, 50):.3f} ms, p95 {np.percentile(ms, 95):.3f} ms"
        )


if __name__ == "__main__":
    main()
