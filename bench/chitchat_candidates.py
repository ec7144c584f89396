"""Candidate chit-chat inputs on gold segmentation, over several deals of TIAGE train to the folds.

The rows are those of ``bench/train_thread_model.py`` (the gold segmentation as the thread state, the
shipped ``chitchat`` features), plus candidate inputs computed from what a thread stores (the message's
text and embedding, the last turn's embedding, the running topic, the vocabulary). Each configuration is
fitted on four of 5 folds of whole dialogues and scored on the fifth (the shipped setting: L2 0.03,
embedding x10, plain gradient descent as ``thread_features.fit_logistic``, here in float32 for speed), for
three deals of the dialogues to the folds (dialogue i to fold i % 5, and shuffled with seeds 1 and 2).
Per deal it prints NEW_TOPIC F1 per fold at the best threshold (mean ± sd, min) and with each fold's
threshold chosen on the other four folds ("nest"); the first column is the mean of "nest" over the deals.

    python bench/chitchat_candidates.py --cache /tmp/tiage.npz [--only base cues ...]

Measured, nothing shipped from it: see docs/operations.md ("Chit-chat candidates over three fold deals").
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")

from chitchat_cv import EMBEDDING_FACTOR, FOLDS, L2  # noqa: E402  (the shipped setting, one place)

from conversations.thread_features import ThreadState  # noqa: E402  (after the path)

THRESHOLDS = np.round(np.arange(0.15, 0.50, 0.025), 3)
DEALS = (None, 1, 2)

OPENER = re.compile(r"^\s*(so|anyway|anyways|by the way|btw|speaking of|well|hey|oh,? and|also|and)\b", re.I)
GREETING = re.compile(
    r"\b(hi|hello|hey|hiya|howdy|how are you|how are you doing|how is it going|how'?s it going"
    r"|nice to meet you|good (morning|evening|afternoon))\b",
    re.I,
)
CLOSING = re.compile(
    r"\b(bye|goodbye|good ?night|see (you|ya)|talk (to you )?(later|soon)|ttyl|(gotta|got to|have to|need to"
    r"|must) (go|run|leave)|take care|(nice|good|great) (talking|chatting) (to|with) you"
    r"|have a (good|great|nice|lovely) (day|night|evening|one|weekend))\b",
    re.I,
)
ABOUT_YOU = re.compile(
    r"\b(what do you do( for (a living|work|fun))?|do you have (any|a|kids|pets|children)"
    r"|any (pets|kids|hobbies|siblings|children)|what kind of|favou?rite|how old are you|where are you from"
    r"|where do you live|tell me about yourself|what do you like to|do you like to"
    r"|are you (married|single|a student|in school)|what are your hobbies|what is your name)\b",
    re.I,
)
PERSONAL_TOPIC = re.compile(
    r"\b(job|work|living|pets?|dogs?|cats?|kids|children|family|hobby|hobbies|music|food|movies?|books?"
    r"|sports?|color|season|school|college|travel|married|wife|husband)\b",
    re.I,
)
N_EXTRA = 13
GROUPS = {  # candidate inputs (indices into extra()) per configuration
    "cues": list(range(8)),
    "similarity": [8, 9, 11, 12],
    "statement_then_question": [10],
    "all13": list(range(N_EXTRA)),
}


def extra(text: str, embedding: np.ndarray, state: ThreadState) -> np.ndarray:
    """The 13 candidate inputs, then the last turn's unit embedding (384)."""
    from conversations.thread_features import _cos, _previous_question, content_words

    question = float("?" in text)
    previous_question = _previous_question(state)
    similarity_last = _cos(embedding, state.last_user)
    similarity_topic = _cos(embedding, state.centroid)
    words = content_words(text)
    novelty = len(words - state.vocabulary) / max(1, len(words))
    opener = float(bool(OPENER.match(text)))
    about_you = float(bool(ABOUT_YOU.search(text)))
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text.strip()) if s]
    ends_asking = float(bool(sentences) and sentences[-1].endswith("?"))
    opens_stating = float(len(sentences) > 1 and not sentences[0].endswith("?"))
    cues = [
        opener,  # 0: "so ...", "anyway ...", "by the way ..."
        opener * question,  # 1
        float(bool(GREETING.search(text))),  # 2
        float(bool(CLOSING.search(text))),  # 3
        about_you,  # 4: "what do you do for a living?", "do you have any pets?"
        about_you * (1.0 - previous_question),  # 5
        float(bool(PERSONAL_TOPIC.search(text))) * question,  # 6
        novelty * question * (1.0 - previous_question),  # 7
        similarity_last - similarity_topic,  # 8
        (similarity_last - similarity_topic) * question,  # 9
        opens_stating * ends_asking,  # 10: "i work for a watch dealer, where do you work?"
        (1.0 - similarity_last) * (1.0 - previous_question),  # 11
        similarity_last * similarity_last,  # 12
    ]
    norm = float(np.linalg.norm(state.last_user)) or 1.0
    return np.concatenate([np.asarray(cues, dtype=np.float32), (state.last_user / norm).astype(np.float32)])


def fit(
    x: np.ndarray, y: np.ndarray, l2: np.ndarray, sample_weight: np.ndarray | None = None, iterations=800
):
    """``thread_features.fit_logistic`` in float32 (the same steps; the fold figures match to 3 decimals)."""
    x = x.astype(np.float32)
    mean, scale = x.mean(0), x.std(0) + 1e-6
    xs = (x - mean) / scale
    w, b = np.zeros(xs.shape[1], np.float32), 0.0
    sw = np.ones(len(y), np.float32) if sample_weight is None else sample_weight.astype(np.float32)
    sw, l2 = sw / sw.sum(), l2.astype(np.float32)
    for _ in range(iterations):
        grad = (1 / (1 + np.exp(-(xs @ w + b))) - y) * sw
        w -= 0.5 * (xs.T @ grad + l2 * w)
        b -= 0.5 * float(grad.sum())
    return lambda rows: 1 / (1 + np.exp(-(((rows.astype(np.float32) - mean) / scale) @ w + b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--cache", type=Path, required=True, help="the .npz of bench/chitchat_cv.py --cache")
    parser.add_argument("--only", nargs="+", default=None, help="run only these configurations")
    args = parser.parse_args()

    import django

    django.setup()
    from train_thread_model import examples, load

    from conversations.thread_features import FEATURES, N_CHITCHAT, N_HAND, chitchat_features, f1

    with np.load(args.cache) as cached:
        seen = dict(zip(cached["texts"].tolist(), cached["vectors"], strict=True))
    tiage = load(args.datasets / "tiage_threads" / "train.jsonl")
    FEATURES["chitchat+candidates"] = lambda text, v, state: np.concatenate(
        [chitchat_features(text, v, state), extra(text, v, state)]
    )
    x, labels, groups = examples(
        tiage, lambda batch: [seen[t] for t in batch], user_speakers=None, feature_set="chitchat+candidates"
    )
    y = (labels == "NEW_TOPIC").astype(np.float32)
    width = N_HAND + 384 + N_CHITCHAT
    shipped = list(range(width))
    previous = list(range(width + N_EXTRA, width + N_EXTRA + 384))

    def logistic(cols: list[int], previous_factor: float = 1.0, positive_weight: float = 1.0) -> Callable:
        strengths = np.full(len(cols), L2)
        for i, c in enumerate(cols):
            strengths[i] *= EMBEDDING_FACTOR if N_HAND <= c < N_HAND + 384 else 1.0
            strengths[i] *= previous_factor if c >= width + N_EXTRA else 1.0

        def train(rows: np.ndarray) -> Callable:
            weight = np.where(y[rows] > 0, positive_weight, 1.0)
            scorer = fit(x[rows][:, cols], y[rows], strengths, weight)
            return lambda held: scorer(x[held][:, cols])

        return train

    configurations = {
        "base": logistic(shipped),
        **{name: logistic(shipped + [width + i for i in idx]) for name, idx in GROUPS.items()},
        "shift_weight2": logistic(shipped, positive_weight=2.0),
        "previous_x10": logistic(shipped + previous, previous_factor=10.0),
        "previous_x30": logistic(shipped + previous, previous_factor=30.0),
    }
    for name, train in configurations.items():
        if args.only and name not in args.only:
            continue
        cells, nested_means = [], []
        for deal in DEALS:
            fold_of = np.arange(len(tiage)) % FOLDS
            if deal is not None:
                fold_of = np.random.default_rng(deal).permutation(len(tiage)) % FOLDS
            folds = fold_of[groups]
            p = np.zeros(len(y))
            for k in range(FOLDS):
                p[folds == k] = train(folds != k)(folds == k)
            table = np.asarray(
                [[f1(y[folds == k] > 0, p[folds == k] >= t) for k in range(FOLDS)] for t in THRESHOLDS]
            )
            best = int(table.mean(1).argmax())
            inner = [table[:, [j for j in range(FOLDS) if j != k]].mean(1).argmax() for k in range(FOLDS)]
            nested = np.asarray([table[inner[k], k] for k in range(FOLDS)])
            nested_means.append(nested.mean())
            cells.append(
                f"{table[best].mean():.3f}±{table[best].std():.3f} min {table[best].min():.3f}"
                f" @{THRESHOLDS[best]:.3f} nest {nested.mean():.3f}"
            )
        print(f"{name:<24} nest over deals {np.mean(nested_means):.4f}  " + " | ".join(cells), flush=True)


if __name__ == "__main__":
    main()
