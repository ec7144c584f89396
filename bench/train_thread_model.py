"""Train the thread scorer's weights (conversations/data/thread_model.json) from the public datasets.

    python bench/train_thread_model.py [--datasets ../shared/datasets]

Profiles: ``task`` from the Schema-Guided Dialogue dev split plus the *tuning* part of our own
support-chat set (bench/data/support_turns.jsonl; its held-out part is never read here), and
``chitchat`` from TIAGE train (NEW_TOPIC; its RESOLUTION scorer is the task one: TIAGE has no
resolutions). Features come from conversations.thread_features, the module that serves them, with
the gold segmentation as the thread state (teacher forcing).

Two things are fitted before the scorers and shared by the profiles: a linear probe that reads "was
the previous user message a question?" off its embedding, and three prototype centroids (resolution,
new topic, not yet fixed) from the hand-written sentences below.

Settings are chosen for data the model has not seen: 5 folds that hold out whole groups (SGD
dialogues by the domain of their first service, support dialogues by their domain, TIAGE by
dialogue). For each scorer, the L2 strength (on the hand features, and how much stronger on the 384
embedding dimensions, or no embedding at all) is picked by the out-of-fold F1 minus the standard
deviation of the per-fold F1 (settings within 0.005 of each other: the one with the better worst
fold), the threshold by the out-of-fold F1 (for the task profile, the mean
of SGD's and the support chats', so that neither kind of data drowns the other); the per-fold
spread is printed. The final weights are then fitted on all the training rows.

``--out PATH`` writes a candidate elsewhere (to compare it with ``bench/threading_eval.py`` after
copying it in place); ``--support-weight`` sets what a support-chat row counts against an SGD row;
``--replayed-rows`` adds a second pass to the chitchat scorer: it is refitted on the gold rows plus the
rows the pipeline itself sees when it replays each TIAGE train fold (measured, not shipped: see
docs/operations.md).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")

# (L2 of the hand features, how many times stronger on the embedding dimensions; None: no embedding).
# A stronger penalty on the 384 embedding dimensions keeps the scorer from memorising the training
# topics ("cleaning the roller" as a resolution) instead of the cues that carry over.
GRID = ((0.03, 1.0), (0.03, 10.0), (0.1, 3.0), (0.03, None))
FOLDS = 5
TIE = 0.005  # settings whose mean-minus-spread differ by less than this are tied
SUPPORT_WEIGHT = 3.0  # a support-chat row counts this much against an SGD row (212 rows vs 2,862)
PROBE_L2 = 0.01
PROBE_ITERATIONS = 300
THRESHOLDS = np.arange(0.2, 0.8, 0.025)

# Written for the prototypes, not taken from any evaluation set.
PROTOTYPE_SENTENCES = {
    "resolution": [
        "That fixed it, thanks.",
        "It works now.",
        "Problem solved.",
        "That did the trick!",
        "All sorted now, thank you.",
        "Restarting it solved the problem.",
        "It's working again.",
        "I got it working.",
        "Never mind, I figured it out.",
        "The money has arrived in my account.",
        "It showed up today, thanks.",
        "Everything is fine now.",
        "Changing the setting worked.",
        "Great, that's all I needed.",
        "Thank you, goodbye.",
    ],
    "new_topic": [
        "By the way, I have another question.",
        "One more thing: how do I change my plan?",
        "Also, a different question.",
        "And how do I update my address?",
        "Separate question about my bill.",
        "Unrelated, but can you help with my account?",
        "While I have you, can I ask something else?",
        "Another issue: my invoice is wrong.",
        "Different topic, do you ship abroad?",
        "One last question, what are your opening hours?",
    ],
    "not_fixed": [
        "It still doesn't work.",
        "Same error as before.",
        "That didn't help.",
        "Nothing changed.",
        "Still broken.",
        "No luck, it fails again.",
        "I tried that and it's still not working.",
        "It's better but still not right.",
        "Now it shows a different error.",
        "It worked once and then stopped again.",
    ],
}


def load(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


TO_TARGET = {"FOLLOW_UP": "CONTINUATION", "RETURN": "NEW_TOPIC"}


def examples(dialogues: list[dict], embed, *, user_speakers: set[str] | None, feature_set: str = "task"):
    """(features, label, dialogue index) for every labelled user turn after the first.

    Support dialogues name each user turn's thread, so a RETURN goes back to that thread's state;
    SGD and TIAGE only mark where a new thread starts. ``feature_set``: a key of
    ``thread_features.FEATURES``.
    """
    from conversations.thread_features import FEATURES, ThreadState, content_words

    turn_features = FEATURES[feature_set]

    texts = sorted({t["utterance"] for d in dialogues for t in d["turns"]})
    vectors = dict(zip(texts, embed(texts), strict=True))
    rows, labels, groups = [], [], []
    for gi, dialogue in enumerate(dialogues):
        state: ThreadState | None = None
        threads: dict[int, ThreadState] = {}
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
                threads[turn.get("thread", 0)] = state
                continue
            label = TO_TARGET.get(turn["label"], turn["label"])
            rows.append(turn_features(text, v, state))
            labels.append(label)
            groups.append(gi)
            if turn["label"] == "RETURN" and turn["thread"] in threads:
                previous_assistant = state.last_assistant_text
                state = threads[turn["thread"]]
                state.last_assistant_text = previous_assistant
            elif label == "NEW_TOPIC":
                state = ThreadState(v, v, v.copy(), content_words(text), state.last_assistant_text)
                threads[turn.get("thread", len(threads))] = state
                continue
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


def train_prototypes(embed) -> dict:
    from conversations.thread_features import PROTOTYPES, set_prototypes

    rows = []
    for name in PROTOTYPES:
        centroid = np.asarray(embed(PROTOTYPE_SENTENCES[name])).mean(axis=0)
        rows.append(centroid / np.linalg.norm(centroid))
    set_prototypes(np.asarray(rows))
    return {name: [round(float(v), 6) for v in row] for name, row in zip(PROTOTYPES, rows, strict=True)}


def _fold_f1(y: np.ndarray, p: np.ndarray, folds: np.ndarray, threshold: float) -> np.ndarray:
    from conversations.thread_features import f1

    return np.asarray([f1(y[folds == k] > 0, p[folds == k] >= threshold) for k in range(FOLDS)])


def train_scorer(
    x: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    weight: np.ndarray,
    name: str,
    *,
    report_masks: dict[str, np.ndarray] | None = None,
) -> dict:
    """Pick the regularisation and the threshold on grouped folds, then fit on everything.

    With ``report_masks`` (kinds of data: SGD, support chat), each kind counts equally: the
    threshold maximises the mean of their out-of-fold F1, and a setting scores that mean minus the
    standard deviation of the per-fold F1.
    """
    from conversations.thread_features import N_HAND, f1, fit_logistic

    def penalty(l2: float, embedding_factor: float | None) -> np.ndarray:
        width = N_HAND if embedding_factor is None else x.shape[1]
        strengths = np.full(width, l2)
        strengths[N_HAND : N_HAND + 384] *= embedding_factor or 1.0  # not the chit-chat cues after it
        return strengths

    def objective(p: np.ndarray, threshold: float) -> float:
        if not report_masks:
            return float(_fold_f1(y, p, folds, threshold).mean())
        return float(np.mean([f1(y[m] > 0, p[m] >= threshold) for m in report_masks.values()]))

    best = None
    for l2, embedding_factor in GRID:
        cols = x if embedding_factor is not None else x[:, :N_HAND]
        strengths = penalty(l2, embedding_factor)
        oof = np.zeros(len(y))
        for k in range(FOLDS):
            train = folds != k
            w, b, mean, scale = fit_logistic(cols[train], y[train], l2=strengths, sample_weight=weight[train])
            oof[~train] = 1 / (1 + np.exp(-(((cols[~train] - mean) / scale) @ w + b)))
        value, threshold = max((objective(oof, float(t)), float(t)) for t in THRESHOLDS)
        fold_f1 = _fold_f1(y, oof, folds, threshold)
        score = value - fold_f1.std()
        print(
            f"    {name:<10} l2={l2:<5} embedding x{embedding_factor!s:<5} objective {value:.3f};"
            f" folds F1 {fold_f1.mean():.3f} ± {fold_f1.std():.3f} (min {fold_f1.min():.3f}) at {threshold:.3f}"
        )
        # within TIE of the best score, the setting with the better worst fold wins (a coin flip
        # at the third decimal otherwise decides between two settings)
        if best is None or score > best[0] + TIE or (score > best[0] - TIE and fold_f1.min() > best[4].min()):
            best = (score, l2, embedding_factor, threshold, fold_f1, oof)
    assert best is not None
    _, l2, embedding_factor, threshold, fold_f1, oof = best
    parts = {
        part: round(f1(y[mask] > 0, oof[mask] >= threshold), 4) for part, mask in (report_masks or {}).items()
    }
    print(
        f"  {name:<10} chosen l2={l2} embedding x{embedding_factor} threshold {threshold:.3f}:"
        f" fold F1 {fold_f1.mean():.3f} ± {fold_f1.std():.3f} [{fold_f1.min():.3f}, {fold_f1.max():.3f}]"
        f" out-of-fold by kind {parts} (n={len(y)}, positives={int(y.sum())})"
    )
    cols = x if embedding_factor is not None else x[:, :N_HAND]
    w, b, mean, scale = fit_logistic(cols, y, l2=penalty(l2, embedding_factor), sample_weight=weight)
    return {
        "weights": [round(float(v), 6) for v in w],
        "bias": round(float(b), 6),
        "mean": [round(float(v), 6) for v in mean],
        "scale": [round(float(v), 6) for v in scale],
        "threshold": round(threshold, 3),
        "l2": l2,
        "embedding_l2_factor": embedding_factor,
        "folds_f1": [round(float(v), 4) for v in fold_f1],
        "oof_f1_by_kind": parts,
    }


def _round_robin(keys: list[str]) -> dict[str, int]:
    """Each group key to a fold, spread evenly over the folds in sorted order."""
    return {key: i % FOLDS for i, key in enumerate(sorted(set(keys)))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--cache", type=Path, default=None, help="keep the texts' embeddings in this .npz")
    parser.add_argument(
        "--out", type=Path, default=None, help="write the model here instead of the shipped path (to compare)"
    )
    parser.add_argument(
        "--support-weight",
        type=float,
        default=SUPPORT_WEIGHT,
        help=f"what a support-chat row counts against an SGD row (default {SUPPORT_WEIGHT})",
    )
    parser.add_argument(
        "--profile",
        choices=("all", "chitchat"),
        default="all",
        help="chitchat: retrain only that profile's new-topic scorer and keep everything else of the"
        " shipped file (probe, prototypes, task profile) byte for byte",
    )
    parser.add_argument(
        "--replayed-rows",
        action="store_true",
        help="chitchat: also train on the states the pipeline builds itself when it replays TIAGE train",
    )
    args = parser.parse_args()

    import django

    django.setup()
    from support_data import load_support

    from agentflow.embeddings import get_embedder
    from conversations.thread_features import MODEL_PATH, N_HAND

    embedder = get_embedder()
    seen: dict[str, np.ndarray] = {}
    if args.cache and args.cache.exists():
        with np.load(args.cache) as cached:
            seen.update(zip(cached["texts"].tolist(), cached["vectors"], strict=True))

    def embed(texts: list[str]) -> list[np.ndarray]:
        missing = [t for t in dict.fromkeys(texts) if t not in seen]
        for i in range(0, len(missing), 64):
            seen.update(zip(missing[i : i + 64], embedder.embed(missing[i : i + 64]), strict=True))
        return [seen[t] for t in texts]

    tiage = load(args.datasets / "tiage_threads" / "train.jsonl")
    if args.profile == "chitchat":
        shipped = json.loads(MODEL_PATH.read_text())
        body = {key: value for key, value in shipped.items() if key != "version"}
        body["profiles"]["chitchat"] = chitchat_profile(
            tiage, embed, shipped["profiles"]["task"]["RESOLUTION"], replayed_rows=args.replayed_rows
        )
        write(body, args.out or MODEL_PATH)
        return
    sgd = load(args.datasets / "sgd_threads" / "dev.jsonl")
    support = load_support("tune")
    probe = train_question_probe(sgd + tiage + support, embed)
    if args.cache:
        embed([t["utterance"] for d in support for t in d["turns"]])
        embed([s for sentences in PROTOTYPE_SENTENCES.values() for s in sentences])
        np.savez(args.cache, texts=np.asarray(list(seen)), vectors=np.asarray(list(seen.values())))
    prototypes = train_prototypes(embed)
    profiles = {}

    print(f"task profile (SGD dev + {len(support)} support dialogues), folds by domain:")
    x_sgd, y_sgd, g_sgd = examples(sgd, embed, user_speakers={"USER"})
    x_sup, y_sup, g_sup = examples(support, embed, user_speakers={"USER"})
    sgd_fold = _round_robin([d["services"][0].split("_")[0] for d in sgd])
    sup_fold = _round_robin([d["domain"] for d in support])
    folds = np.concatenate(
        [
            [sgd_fold[sgd[g]["services"][0].split("_")[0]] for g in g_sgd],
            [sup_fold[support[g]["domain"]] for g in g_sup],
        ]
    )
    x = np.concatenate([x_sgd, x_sup])
    labels = np.concatenate([y_sgd, y_sup])
    weight = np.concatenate([np.ones(len(y_sgd)), np.full(len(y_sup), args.support_weight)])
    masks = {
        "sgd": np.arange(len(labels)) < len(y_sgd),
        "support": np.arange(len(labels)) >= len(y_sgd),
    }
    task_new = train_scorer(
        x, (labels == "NEW_TOPIC").astype(float), folds, weight, "NEW_TOPIC", report_masks=masks
    )
    task_res = train_scorer(
        x, (labels == "RESOLUTION").astype(float), folds, weight, "RESOLUTION", report_masks=masks
    )
    profiles["task"] = {"NEW_TOPIC": task_new, "RESOLUTION": task_res}

    profiles["chitchat"] = chitchat_profile(tiage, embed, task_res, replayed_rows=args.replayed_rows)

    body = {
        "embedding_model": embedder.model_id,
        "n_hand": N_HAND,
        "question_probe": probe,
        "prototypes": prototypes,
        "profiles": profiles,
    }
    write(body, args.out or MODEL_PATH)


def chitchat_profile(tiage: list[dict], embed, resolution: dict, *, replayed_rows: bool = False) -> dict:
    """The chitchat profile: a new-topic scorer over the chit-chat features, folds by dialogue; its
    resolution scorer is the task one (TIAGE has no resolutions).

    ``replayed_rows``: a second pass that also trains on the states the pipeline builds itself. Each
    fold is replayed through the real ``decide_thread`` (``chitchat_cv.replay``: the pipeline's thread
    bookkeeping) with the first pass's setting fitted on the other four folds, and its scored turns'
    features (against the thread the pipeline made active, right or wrong) are added to the
    gold-segmentation rows for the final fit, at the first pass's L2 and threshold."""
    print("chitchat profile (TIAGE train), folds by dialogue:")
    x, labels, groups = examples(tiage, embed, user_speakers=None, feature_set="chitchat")
    y = (labels == "NEW_TOPIC").astype(float)
    folds = groups % FOLDS
    chat_new = train_scorer(x, y, folds, np.ones(len(labels)), "NEW_TOPIC")
    if replayed_rows:
        chat_new = _refit_on_replayed(tiage, embed, x, y, folds, chat_new, resolution)
    return {"features": "chitchat", "NEW_TOPIC": chat_new, "RESOLUTION": resolution}


def _refit_on_replayed(
    tiage: list[dict],
    embed,
    x: np.ndarray,
    y: np.ndarray,
    folds: np.ndarray,
    first: dict,
    resolution: dict,
) -> dict:
    from chitchat_cv import replay

    from conversations.thread_features import N_HAND, Scorer, ThreadModel, _scorer, fit_logistic

    if first["embedding_l2_factor"] is None:
        raise ValueError("--replayed-rows needs a scorer that reads the embedding (the chosen one does not)")
    strengths = np.full(x.shape[1], first["l2"])
    strengths[N_HAND : N_HAND + 384] *= first["embedding_l2_factor"]
    texts = sorted({t["utterance"] for d in tiage for t in d["turns"]})
    vectors = dict(zip(texts, embed(texts), strict=True))
    parts_x, parts_y = [x], [y]
    for k in range(FOLDS):
        w, b, mean, scale = fit_logistic(x[folds != k], y[folds != k], l2=strengths)
        f32 = np.float32
        scorer = Scorer(w.astype(f32), float(b), mean.astype(f32), scale.astype(f32), first["threshold"])
        model = ThreadModel("chitchat", scorer, _scorer(resolution), feature_set="chitchat")
        rows: list[np.ndarray] = []
        gold, _, _ = replay([d for i, d in enumerate(tiage) if i % FOLDS == k], vectors, model, rows)
        parts_x.append(np.asarray(rows))
        parts_y.append(np.asarray(gold, dtype=float))
    xs, ys = np.concatenate(parts_x), np.concatenate(parts_y)
    print(f"  NEW_TOPIC  refitted on {len(y)} gold-segmentation rows + {len(ys) - len(y)} replayed rows")
    w, b, mean, scale = fit_logistic(xs, ys, l2=strengths)
    return {
        **first,
        "weights": [round(float(v), 6) for v in w],
        "bias": round(float(b), 6),
        "mean": [round(float(v), 6) for v in mean],
        "scale": [round(float(v), 6) for v in scale],
        "replayed_rows": len(ys) - len(y),
    }


def write(body: dict, out: Path) -> None:
    digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:10]
    version = f"{dt.date.today():%Y%m%d}-{digest}"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"version": version, **body}, separators=(",", ":")))
    print(f"wrote {out} version {version} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
