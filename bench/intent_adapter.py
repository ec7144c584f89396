"""A learned linear adapter on the sentence embeddings, for the intent classifier only: does it transfer?

    python bench/intent_adapter.py [--checks groups,banking-sgd,sgd-banking] [--rank 0] [--decay 0.01]
        [--steps 1500] [--cache .data/intent_vectors.npz]
    python bench/intent_adapter.py --test [--decay ...]   # BANKING77 test.csv, once, at the end

The adapter maps a unit sentence vector ``x`` to ``normalize(W x)``; every vector the classifier sees
(its categories' phrases, the message) goes through it, nothing else does. ``W`` starts at the identity
and is trained once, offline, by few-shot episodes shaped like the classifier's task: sample up to
``--ways`` intents, ``--train-shots`` examples each as the prototype (the unit mean of the adapted examples)
and ``--queries-per`` other rows each as queries; the loss is the cross-entropy of the queries'
softmax over ``cosine / --temperature`` to the prototypes, plus ``--decay`` x |W - I|^2 (the adapter
is pulled back towards the identity). ``--rank r`` > 0 trains ``W = I + A B^T`` (A, B: d x r, decay
on A and B) instead of a full matrix. Numpy only: the gradients are written out (``_episode``), Adam
updates them; everything is seeded.

The checks (always the adapter against the identity on the very same folds, through
``bench/intent_eval.py``'s ``evaluate_fold``: accuracy, in-scope answered right and out of scope
caught at the threshold, other domains caught):

- ``groups``: BANKING77's intents cut into ``--groups`` groups (seeded); for each group an adapter
  is trained on ``train.csv`` rows of the *other* groups' intents only, and the folds (``--seeds``
  10-shot samples of the group's intents, up to 25 other rows each classified, a fifth of the group
  left out for out of scope) run on the held-out group: intents it never saw, same domain.
- ``banking-sgd``: trained on all of BANKING77 ``train.csv``, evaluated on ``intent_eval.py --sgd``
  (travel, media, events, restaurants: a domain it never saw; TIAGE chit-chat as the other domain).
- ``sgd-banking``: the reverse: trained on the SGD dev turns that state an intent (every SGD intent),
  evaluated on ``intent_eval.py --folds`` (BANKING77 intent groups of 20, 50 and 77). The folds' other
  domains are SGD and TIAGE openings, some of which the adapter saw in training.

``--test`` trains on all of ``train.csv`` and prints BANKING77 ``test.csv`` 10-shot accuracy with
and without the adapter (the held-out figure: read once, never used for choosing).
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import intent_eval  # bench/ is not a package: found through sys.path

KEYS = ("accuracy", "in-scope right", "out of scope caught", "other domains caught")


def _unit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    norms = np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-9)
    return rows / norms, norms


def _through_unit(grad: np.ndarray, unit: np.ndarray, norms: np.ndarray) -> np.ndarray:
    """Gradient with respect to ``z`` of a loss whose gradient with respect to ``z / |z|`` is ``grad``."""
    return (grad - unit * np.sum(unit * grad, axis=1, keepdims=True)) / norms


def _episode(
    w: np.ndarray, shots: np.ndarray, queries: np.ndarray, labels: np.ndarray, scale: float
) -> tuple[float, np.ndarray]:
    """Prototype cross-entropy of one episode and its gradient with respect to ``w``.

    ``shots``: (ways, k, d) unit vectors; ``queries``: (m, d); ``labels``: (m,) the queries' ways.
    """
    ways, k, d = shots.shape
    flat = shots.reshape(-1, d)
    unit_s, norm_s = _unit(flat @ w.T)
    raw = unit_s.reshape(ways, k, d).mean(axis=1)
    protos, norm_p = _unit(raw)
    unit_q, norm_q = _unit(queries @ w.T)
    logits = scale * unit_q @ protos.T
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    m = len(labels)
    loss = float(-np.log(probs[np.arange(m), labels] + 1e-12).mean())
    d_logits = probs
    d_logits[np.arange(m), labels] -= 1.0
    d_logits /= m
    g_unit_q = scale * d_logits @ protos
    g_protos = scale * d_logits.T @ unit_q
    g_raw = _through_unit(g_protos, protos, norm_p)
    g_unit_s = np.repeat(g_raw[:, None, :] / k, k, axis=1).reshape(-1, d)
    g_w = (
        _through_unit(g_unit_s, unit_s, norm_s).T @ flat + _through_unit(g_unit_q, unit_q, norm_q).T @ queries
    )
    return loss, g_w


def train_adapter(
    by_intent: dict[str, np.ndarray],
    *,
    rank: int,
    decay: float,
    steps: int,
    ways: int,
    shots: int,
    queries_per: int,
    temperature: float,
    learning_rate: float,
    seed: int,
) -> np.ndarray:
    """``W`` (d x d) trained on few-shot episodes of ``by_intent`` (intent -> unit vectors)."""
    rng = np.random.default_rng(seed)
    names = sorted(n for n, v in by_intent.items() if len(v) >= 3)
    if len(names) < 2:
        raise SystemExit("intent_adapter: fewer than 2 intents with 3 rows to train on")
    d = next(iter(by_intent.values())).shape[1]
    eye = np.eye(d, dtype=np.float64)
    if rank:
        params = [rng.normal(0, 0.01, (d, rank)), np.zeros((d, rank))]
    else:
        params = [np.zeros((d, d))]  # W - I
    moments = [np.zeros_like(p) for p in params]
    squares = [np.zeros_like(p) for p in params]
    beta1, beta2 = 0.9, 0.999
    recent: collections.deque[float] = collections.deque(maxlen=100)
    started = time.perf_counter()
    for step in range(1, steps + 1):
        w = eye + (params[0] @ params[1].T if rank else params[0])
        chosen = rng.choice(len(names), size=min(ways, len(names)), replace=False)
        k = min(shots, min(len(by_intent[names[i]]) for i in chosen) - 1)
        shot_rows, query_rows, labels = [], [], []
        for way, index in enumerate(chosen):
            rows = by_intent[names[index]]
            order = rng.permutation(len(rows))
            shot_rows.append(rows[order[:k]])
            taken = order[k : k + queries_per]
            query_rows.append(rows[taken])
            labels += [way] * len(taken)
        loss, g_w = _episode(
            w, np.stack(shot_rows), np.concatenate(query_rows), np.array(labels), 1.0 / temperature
        )
        recent.append(loss)
        if rank:
            a, b = params
            grads = [g_w @ b + 2 * decay * a, g_w.T @ a + 2 * decay * b]
        else:
            grads = [g_w + 2 * decay * params[0]]
        for p, g, m1, m2 in zip(params, grads, moments, squares, strict=True):
            m1 *= beta1
            m1 += (1 - beta1) * g
            m2 *= beta2
            m2 += (1 - beta2) * g * g
            p -= learning_rate * (m1 / (1 - beta1**step)) / (np.sqrt(m2 / (1 - beta2**step)) + 1e-8)
        if step % 500 == 0 or step == steps:
            offset = params[0] @ params[1].T if rank else params[0]
            print(
                f"    step {step}: episode loss {statistics.fmean(recent):.4f}, |W - I| "
                f"{np.linalg.norm(offset):.3f}, {time.perf_counter() - started:.1f} s",
                flush=True,
            )
    return (eye + (params[0] @ params[1].T if rank else params[0])).astype(np.float32)


class AdaptedEmbedder:
    """``inner``'s vectors mapped to ``normalize(W x)`` (the identity when ``w`` is None)."""

    def __init__(self, inner, w: np.ndarray | None) -> None:
        self.inner, self.w = inner, w
        self.dimensions, self.model_id = inner.dimensions, inner.model_id

    def embed(self, texts):
        vectors = self.inner.embed(texts)
        if self.w is None or not len(vectors):
            return vectors
        return _unit(vectors @ self.w.T)[0].astype(np.float32)

    def embed_one(self, text: str):
        return self.embed([text])[0]

    def save(self) -> None:
        self.inner.save()


def banking_rows(datasets: Path) -> dict[str, list[str]]:
    by_intent: dict[str, list[str]] = collections.defaultdict(list)
    for row in intent_eval.read(datasets / "banking77" / "train.csv"):
        by_intent[row["category"]].append(row["text"])
    return dict(by_intent)


def vectors_of(embedder, by_intent: dict[str, list[str]]) -> dict[str, np.ndarray]:
    return {name: embedder.embed(texts).astype(np.float64) for name, texts in by_intent.items()}


def group_folds(args, embedder, names: list[str], by_intent: dict[str, list[str]], others: list[str]):
    """``intent_eval.run_folds`` on a fixed set of intents (those of one held-out group)."""
    figures = []
    for seed in range(args.seeds):
        rng = random.Random(f"adapter-{len(names)}-{seed}")
        categories, queries, held = intent_eval.few_shot_fold(
            by_intent, names, rng, args.shots, args.queries, seed, group_seed=f"adapter-group-{len(names)}"
        )
        fold, _ = intent_eval.evaluate_fold(categories, queries, held, others, embedder, args.threshold)
        figures.append(fold)
    return figures


def summary(label: str, figures: list[dict[str, float]]) -> dict[str, float]:
    means = {key: statistics.fmean(f[key] for f in figures) for key in KEYS}
    spreads = {key: statistics.pstdev([f[key] for f in figures]) for key in KEYS}
    print(
        f"  {label:10s} " + "  ".join(f"{key} {means[key]:.4f} ±{spreads[key]:.4f}" for key in KEYS),
        flush=True,
    )
    return means


def compare(label: str, base: list[dict[str, float]], adapted: list[dict[str, float]]) -> None:
    print(f"{label}: {len(base)} folds, mean ± std over folds")
    b = summary("identity", base)
    a = summary("adapter", adapted)
    deltas = {key: [y[key] - x[key] for x, y in zip(base, adapted, strict=True)] for key in KEYS}
    print(
        "  change     "
        + "  ".join(
            f"{key} {100 * (a[key] - b[key]):+.2f} pt (per fold {100 * min(deltas[key]):+.1f}..{100 * max(deltas[key]):+.1f})"
            for key in KEYS
        ),
        flush=True,
    )


def quiet(function, *args, **kwargs):
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        return function(*args, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=intent_eval.ROOT.parent / "shared" / "datasets")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--checks", default="groups,banking-sgd,sgd-banking")
    parser.add_argument("--groups", type=int, default=4, help="BANKING77 intent groups (check groups)")
    parser.add_argument("--rank", type=int, default=0, help="0: a full d x d matrix; r: I + A B^T")
    parser.add_argument("--decay", type=float, default=0.01, help="weight of |W - I|^2 in the loss")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--ways", type=int, default=20)
    parser.add_argument("--train-shots", type=int, default=10)
    parser.add_argument("--queries-per", type=int, default=5)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--train-seed", type=int, default=0)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sgd-seeds", type=int, default=5)
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--queries", type=int, default=25)
    parser.add_argument("--sizes", type=intent_eval.sizes, default=[20, 50, 77])
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--save", type=Path, default=None, help="write the all-BANKING77 adapter (.npy)")
    parser.add_argument("--test", action="store_true", help="BANKING77 test.csv once (see above)")
    args = parser.parse_args()
    if args.groups < 2 or args.ways < 2:
        parser.error("--groups and --ways must be at least 2")
    if min(args.steps, args.train_shots, args.queries_per, args.seeds, args.sgd_seeds, args.shots) < 1:
        parser.error(
            "--steps, --train-shots, --queries-per, --seeds, --sgd-seeds and --shots must be at least 1"
        )
    if args.rank < 0 or args.decay < 0 or args.temperature <= 0 or args.learning_rate <= 0:
        parser.error("--rank and --decay must be at least 0, --temperature and --learning-rate above 0")
    import django

    django.setup()
    base_embedder = intent_eval.CachedEmbedder(args.cache)

    def train(by_intent: dict[str, np.ndarray]) -> np.ndarray:
        return train_adapter(
            by_intent,
            rank=args.rank,
            decay=args.decay,
            steps=args.steps,
            ways=args.ways,
            shots=args.train_shots,
            queries_per=args.queries_per,
            temperature=args.temperature,
            learning_rate=args.learning_rate,
            seed=args.train_seed,
        )

    print(
        f"adapter: rank {args.rank or 'full'}, decay {args.decay}, {args.steps} episodes of {args.ways} ways x "
        f"{args.train_shots} shots + {args.queries_per} queries, temperature {args.temperature}, "
        f"learning rate {args.learning_rate}, seed {args.train_seed}",
        flush=True,
    )
    banking = banking_rows(args.datasets)
    if args.test:
        w = train(vectors_of(base_embedder, banking))
        if args.save:
            np.save(args.save, w)
        folder = args.datasets / "banking77"
        test = intent_eval.read(folder / "test.csv")
        from intents.classifier import IntentClassifier

        categories = intent_eval.categories_from(intent_eval.read(folder / "train_10shot.csv"))
        for label, matrix in (("identity", None), ("adapter", w)):
            embedder = AdaptedEmbedder(base_embedder, matrix)
            classifier = IntentClassifier.build(categories, embedder)
            vectors = embedder.embed([row["text"] for row in test])
            hits = [
                classifier.classify(v).intent == row["category"] for v, row in zip(vectors, test, strict=True)
            ]
            print(f"BANKING77 test.csv 10-shot, {label}: accuracy {sum(hits) / len(hits):.4f}")
        base_embedder.save()
        return

    checks = args.checks.split(",")
    others = intent_eval.other_domain_messages(args.datasets)
    if "groups" in checks:
        names = sorted(banking)
        random.Random("adapter-groups").shuffle(names)
        base_all, adapted_all = [], []
        for g in range(args.groups):
            held = sorted(names[g :: args.groups])
            seen = {n: banking[n] for n in names if n not in held}
            print(f"group {g}: train on {len(seen)} intents, evaluate on {len(held)} unseen", flush=True)
            w = train(vectors_of(base_embedder, seen))
            base = group_folds(args, AdaptedEmbedder(base_embedder, None), held, banking, others)
            adapted = group_folds(args, AdaptedEmbedder(base_embedder, w), held, banking, others)
            compare(f"  group {g}", base, adapted)
            base_all += base
            adapted_all += adapted
        compare(f"held-out BANKING77 intent groups (all {args.groups})", base_all, adapted_all)
    if "banking-sgd" in checks:
        print("banking -> SGD: train on all BANKING77 train.csv", flush=True)
        w = train(vectors_of(base_embedder, banking))
        if args.save:
            np.save(args.save, w)
        sgd_args = argparse.Namespace(**{**vars(args), "seeds": args.sgd_seeds})
        base = quiet(intent_eval.run_sgd, sgd_args, AdaptedEmbedder(base_embedder, None))
        adapted = quiet(intent_eval.run_sgd, sgd_args, AdaptedEmbedder(base_embedder, w))
        compare("banking -> SGD proxy", base, adapted)
    if "sgd-banking" in checks:
        print("SGD -> banking: train on the SGD dev turns stating an intent (all intents)", flush=True)
        sgd = intent_eval.sgd_intents(args.datasets)
        w = train(vectors_of(base_embedder, sgd))
        base = quiet(intent_eval.run_folds, args, AdaptedEmbedder(base_embedder, None))
        adapted = quiet(intent_eval.run_folds, args, AdaptedEmbedder(base_embedder, w))
        compare("SGD -> BANKING77 folds", base, adapted)
    base_embedder.save()


if __name__ == "__main__":
    main()
