"""Train the thread scorer's weights (conversations/data/thread_model.json) from the public datasets.

    python bench/train_thread_model.py [--datasets ../shared/datasets]

Profiles: ``task`` from the Schema-Guided Dialogue dev split (NEW_TOPIC and RESOLUTION scorers),
``chitchat`` from TIAGE train (NEW_TOPIC; its RESOLUTION scorer is the task one: TIAGE has no
resolutions). Features come from conversations.thread_features, the module that serves them, with
the gold segmentation as the thread state (teacher forcing). One of them reads "was the previous user
message a question?" off its embedding with a linear probe, fitted first on both datasets' texts
(label: the text has a "?") and shared by the profiles. Thresholds are picked by 5-fold
cross-validation by dialogue; the cross-validated F1 is printed, an honest estimate for unseen data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")

L2 = 0.03
PROBE_L2 = 0.01
PROBE_ITERATIONS = 300


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def examples(dialogues: list[dict], embed, *, user_speakers: set[str] | None):
    """(features, label, dialogue index) for every labelled user turn after the first."""
    from conversations.thread_features import ThreadState, content_words, turn_features

    texts = sorted({t["utterance"] for d in dialogues for t in d["turns"]})
    vectors = dict(zip(texts, embed(texts), strict=True))
    rows, labels, groups = [], [], []
    for gi, dialogue in enumerate(dialogues):
        state: ThreadState | None = None
        for turn in dialogue["turns"]:
            text = turn["utterance"]
            is_user = user_speakers is None or turn["speaker"] in user_speakers
            if not is_user:
                if state is not None:
                    state.last_assistant_text = text
                    state.vocabulary |= content_words(text)
                continue
            v = vectors[text]
            if turn["label"] == "FIRST" or state is None:
                state = ThreadState(v, v, v.copy(), content_words(text))
                continue
            rows.append(turn_features(text, v, state))
            labels.append(turn["label"])
            groups.append(gi)
            if turn["label"] == "NEW_TOPIC":
                state = ThreadState(v, v, v.copy(), content_words(text), state.last_assistant_text)
            else:
                state.last_user = v
                state.centroid = state.centroid + v
                state.vocabulary |= content_words(text)
                state.user_turns += 1
            if user_speakers is None:  # every turn is a user turn (TIAGE): no assistant text
                state.last_assistant_text = ""
    return np.asarray(rows), np.asarray(labels), np.asarray(groups)


def train_question_probe(dialogues: list[dict], embed) -> dict:
    """P(a message is a question | its embedding), as raw-space weights and bias."""
    from conversations.thread_features import fit_logistic, set_question_probe

    texts = sorted({t["utterance"] for d in dialogues for t in d["turns"]})
    x = np.asarray(embed(texts))
    y = np.asarray(["?" in t for t in texts], dtype=float)
    w, b, mean, scale = fit_logistic(x, y, l2=PROBE_L2, iterations=PROBE_ITERATIONS)
    weights = w / scale
    bias = float(b - (mean / scale) @ w)
    accuracy = float((((x @ weights + bias) > 0) == (y > 0)).mean())
    print(f"question probe: accuracy {accuracy:.3f} on {len(texts)} texts")
    set_question_probe(weights, bias)
    return {
        "weights": [round(float(v), 6) for v in weights],
        "bias": round(bias, 6),
        "accuracy": round(accuracy, 4),
    }


def train_scorer(x: np.ndarray, y: np.ndarray, groups: np.ndarray, name: str) -> dict:
    from conversations.thread_features import f1, fit_logistic

    oof = np.zeros(len(y))
    for k in range(5):
        train = (groups % 5) != k
        w, b, mean, scale = fit_logistic(x[train], y[train], l2=L2)
        oof[~train] = 1 / (1 + np.exp(-(((x[~train] - mean) / scale) @ w + b)))
    scored = [(f1(y.astype(bool), oof >= t), float(t)) for t in np.arange(0.2, 0.8, 0.025)]
    best_f1, threshold = max(scored)
    print(
        f"  {name:<10} cross-validated F1 {best_f1:.3f} at threshold {threshold:.3f} (n={len(y)}, positives={int(y.sum())})"
    )
    w, b, mean, scale = fit_logistic(x, y, l2=L2)
    return {
        "weights": [round(float(v), 6) for v in w],
        "bias": round(float(b), 6),
        "mean": [round(float(v), 6) for v in mean],
        "scale": [round(float(v), 6) for v in scale],
        "threshold": round(threshold, 3),
        "cv_f1": round(best_f1, 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    args = parser.parse_args()

    import django

    django.setup()
    from agentflow.embeddings import get_embedder
    from conversations.thread_features import MODEL_PATH

    embedder = get_embedder()

    seen: dict[str, np.ndarray] = {}

    def embed(texts: list[str]) -> list[np.ndarray]:
        missing = [t for t in dict.fromkeys(texts) if t not in seen]
        for i in range(0, len(missing), 64):
            seen.update(zip(missing[i : i + 64], embedder.embed(missing[i : i + 64]), strict=True))
        return [seen[t] for t in texts]

    sgd = load(args.datasets / "sgd_threads" / "dev.jsonl")
    tiage = load(args.datasets / "tiage_threads" / "train.jsonl")
    probe = train_question_probe(sgd + tiage, embed)
    profiles = {}
    print("task profile (SGD dev):")
    x, labels, groups = examples(sgd, embed, user_speakers={"USER"})
    task_new = train_scorer(x, (labels == "NEW_TOPIC").astype(float), groups, "NEW_TOPIC")
    task_res = train_scorer(x, (labels == "RESOLUTION").astype(float), groups, "RESOLUTION")
    profiles["task"] = {"NEW_TOPIC": task_new, "RESOLUTION": task_res}
    print("chitchat profile (TIAGE train):")
    x, labels, groups = examples(tiage, embed, user_speakers=None)
    chat_new = train_scorer(x, (labels == "NEW_TOPIC").astype(float), groups, "NEW_TOPIC")
    profiles["chitchat"] = {"NEW_TOPIC": chat_new, "RESOLUTION": task_res}
    MODEL_PATH.parent.mkdir(exist_ok=True)
    MODEL_PATH.write_text(
        json.dumps(
            {"embedding_model": embedder.model_id, "l2": L2, "question_probe": probe, "profiles": profiles},
            separators=(",", ":"),
        )
    )
    print(f"wrote {MODEL_PATH} ({MODEL_PATH.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
