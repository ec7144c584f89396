"""A lexical channel for the intent classifier, measured and not adopted (docs/operations.md).

    python bench/intent_lexical.py [--weights 0,0.05,0.1,0.2,0.3] [--seeds 3] [--sgd-seeds 5] \
        [--cache .data/intent_vectors.npz] [--chars 3,4,5 | --chars none]

TF-IDF vectors of the words and the character n-grams of the words (3-5 by default) of every
category's phrases (examples, description, name: what the classifier embeds); the inverse document
frequency counts categories, so a term every category uses separates none. A message's lexical score
for a category is half its best phrase's cosine and half the cosine with the sum of the phrases,
like the embedding side's similarity, and ``weight`` times it is added to the classifier's logits
(before the temperature): a weighted logit sum. The product's ``IntentClassifier`` is used
unchanged: the lexical scores enter through its per-category bias (a logit of
``0.5 * (embedding @ weights + bias) + ...``, so ``2 * weight * score`` added to the bias adds
``weight * score`` to the logit).

For each weight (0: the product as it is) it runs ``bench/intent_eval.py``'s BANKING77 intent-group folds and
its SGD multi-domain proxy (``--sgd``) and prints their aggregates. ``--test`` instead prints
BANKING77 ``test.csv`` accuracy once for the product and one weight (the held-out figure: never
for choosing).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

import intent_eval  # bench/ is not a package: found through sys.path

CHAR_NGRAMS: tuple[int, ...] = (3, 4, 5)
MAX_CHARS = 2000  # longer texts are cut: the channel's time grows with the text's length
_WORD = re.compile(r"\w+")


def _features(text: str) -> Counter[str]:
    """Words and the character n-grams of each padded word (any script: ``\\w`` is Unicode)."""
    counts: Counter[str] = Counter()
    for word in _WORD.findall(text[:MAX_CHARS].lower()):
        counts["w:" + word] += 1
        padded = f"<{word}>"
        for n in CHAR_NGRAMS:
            for start in range(max(1, len(padded) - n + 1)):
                counts["c:" + padded[start : start + n]] += 1
    return counts


@dataclass(frozen=True)
class Lexicon:
    """TF-IDF vectors of the phrases, kept as an inverted index (feature -> phrases, weights).

    The inverse document frequency counts categories, not phrases: a term every category uses
    separates none of them.
    """

    columns: dict[str, int]
    idf: np.ndarray  # (n_features,)
    unseen_idf: float  # a term no category has: it only lengthens the message's vector
    starts: np.ndarray  # (n_features + 1,) postings of feature f: [starts[f], starts[f + 1])
    phrases: np.ndarray  # (n_postings,) phrase index
    weights: np.ndarray  # (n_postings,) the phrase's unit-vector weight
    n_phrases: int
    centroid_norms: np.ndarray  # (k,) length of each category's summed unit phrase vectors

    @classmethod
    def build(cls, phrases: Sequence[str], owners: np.ndarray, k: int) -> Lexicon:
        counted = [_features(text) for text in phrases]
        seen_by: dict[str, set[int]] = {}
        for counts, owner in zip(counted, owners.tolist(), strict=True):
            for feature in counts:
                seen_by.setdefault(feature, set()).add(owner)
        columns = {feature: column for column, feature in enumerate(sorted(seen_by))}
        idf = np.array([math.log((1 + k) / (1 + len(seen_by[f]))) for f in columns], dtype=np.float32)
        postings: list[list[tuple[int, float]]] = [[] for _ in columns]
        per_category: list[dict[int, float]] = [{} for _ in range(k)]
        for index, (counts, owner) in enumerate(zip(counted, owners.tolist(), strict=True)):
            row = {columns[f]: (1 + math.log(c)) * float(idf[columns[f]]) for f, c in counts.items()}
            norm = math.sqrt(sum(v * v for v in row.values()))
            if norm == 0:
                continue
            for column, value in row.items():
                postings[column].append((index, value / norm))
                per_category[owner][column] = per_category[owner].get(column, 0.0) + value / norm
        starts = np.zeros(len(columns) + 1, dtype=np.int64)
        starts[1:] = np.cumsum([len(p) for p in postings])
        flat = [entry for posting in postings for entry in posting]
        return cls(
            columns,
            idf,
            math.log(1 + k),
            starts,
            np.array([e[0] for e in flat], dtype=np.int64),
            np.array([e[1] for e in flat], dtype=np.float32),
            len(phrases),
            np.array([math.sqrt(sum(v * v for v in c.values())) for c in per_category], dtype=np.float32),
        )

    def scores(self, text: str, owners: np.ndarray, k: int) -> np.ndarray:
        """Per category: half the best phrase's cosine, half the cosine with the phrases' sum."""
        counts = _features(text)
        if not counts or self.n_phrases == 0:
            return np.zeros(k, dtype=np.float32)
        known, values, norm2 = [], [], 0.0
        for feature, count in counts.items():
            column = self.columns.get(feature)
            weight = (1 + math.log(count)) * (self.unseen_idf if column is None else float(self.idf[column]))
            norm2 += weight * weight
            if column is not None and weight > 0:
                known.append(column)
                values.append(weight)
        if not known or norm2 == 0:
            return np.zeros(k, dtype=np.float32)
        columns = np.array(known, dtype=np.int64)
        lengths = self.starts[columns + 1] - self.starts[columns]
        take = np.repeat(self.starts[columns] - np.cumsum(lengths) + lengths, lengths) + np.arange(
            int(lengths.sum())
        )
        contributions = self.weights[take] * np.repeat(np.array(values, dtype=np.float32), lengths)
        per_phrase = np.bincount(self.phrases[take], contributions, minlength=self.n_phrases)
        per_phrase /= math.sqrt(norm2)
        best = np.zeros(k, dtype=np.float64)
        np.maximum.at(best, owners, per_phrase)
        summed = np.bincount(owners, per_phrase, minlength=k) / np.maximum(self.centroid_norms, 1e-9)
        return (0.5 * best + 0.5 * summed).astype(np.float32)


@dataclass(frozen=True)
class LexicalClassifier:
    """The product's classifier plus the lexical channel at ``weight``."""

    inner: object  # intents.classifier.IntentClassifier
    lexicon: Lexicon
    weight: float

    @classmethod
    def build(cls, categories, embedder, *, weight: float) -> LexicalClassifier:
        from intents.classifier import IntentClassifier, _phrases

        inner = IntentClassifier.build(categories, embedder)
        texts = [phrase for category in categories for phrase in _phrases(category)]
        return cls(inner, Lexicon.build(texts, inner.owners, len(categories)), weight)

    def classify(self, embedding: np.ndarray, *, text: str = "", runners_up: int = 3):
        inner = self.inner
        if self.weight and text and inner.categories:  # type: ignore[attr-defined]
            lexical = self.lexicon.scores(text, inner.owners, len(inner.categories))  # type: ignore[attr-defined]
            inner = dataclasses.replace(inner, bias=inner.bias + 2 * self.weight * lexical)  # type: ignore[attr-defined,type-var]
        return inner.classify(embedding, runners_up=runners_up)  # type: ignore[attr-defined]


def floats(raw: str) -> list[float]:
    try:
        return [float(part) for part in raw.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {raw!r}") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=intent_eval.ROOT.parent / "shared" / "datasets")
    parser.add_argument("--weights", type=floats, default=[0.0, 0.05, 0.1, 0.2, 0.3])
    parser.add_argument("--sizes", type=intent_eval.sizes, default=[20, 50, 77])
    parser.add_argument("--seeds", type=int, default=3, help="BANKING77 samples per size")
    parser.add_argument("--sgd-seeds", type=int, default=5, help="SGD proxy samples")
    parser.add_argument("--chars", default="3,4,5", help="character n-gram lengths, or none")
    parser.add_argument("--shots", type=int, default=10)
    parser.add_argument("--queries", type=int, default=25)
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--test", action="store_true", help="BANKING77 test.csv once (see above)")
    parser.add_argument(
        "--timing",
        action="store_true",
        help="ms per classification (embedding excluded), product and each weight interleaved, 77 intents",
    )
    args = parser.parse_args()
    global CHAR_NGRAMS
    CHAR_NGRAMS = () if args.chars == "none" else tuple(int(n) for n in args.chars.split(","))
    import django

    django.setup()
    from intents.classifier import IntentClassifier

    embedder = intent_eval.CachedEmbedder(args.cache)
    if args.test:
        folder = args.datasets / "banking77"
        test = intent_eval.read(folder / "test.csv")
        vectors = embedder.embed([row["text"] for row in test])
        categories = intent_eval.categories_from(intent_eval.read(folder / "train_10shot.csv"))
        for weight in [0.0, *args.weights]:
            classifier = LexicalClassifier.build(categories, embedder, weight=weight)
            hits = [
                classifier.classify(v, text=row["text"]).intent == row["category"]
                for v, row in zip(vectors, test, strict=True)
            ]
            print(
                f"BANKING77 test.csv 10-shot, lexical weight {weight}: accuracy {sum(hits) / len(hits):.4f}"
            )
        embedder.save()
        return
    if args.timing:
        timing(args, embedder)
        return
    for weight in args.weights:
        print(f"\n=== lexical weight {weight} (chars {args.chars}) ===")

        def build(categories, embedder, weight=weight):
            if weight == 0:
                return IntentClassifier.build(categories, embedder)
            return LexicalClassifier.build(categories, embedder, weight=weight)

        intent_eval.run_folds(args, embedder, build=build)
        intent_eval.run_sgd(_with(args, seeds=args.sgd_seeds), embedder, build=build)


def timing(args: argparse.Namespace, embedder) -> None:
    """All 77 BANKING77 intents, 10 random examples each, 20 other train.csv rows each classified by
    the product and by each weight in turn (message by message, so that load hits all alike)."""
    import random
    import time

    from agentflow.types import IntentCategory
    from intents.classifier import IntentClassifier

    by_intent: dict[str, list[str]] = {}
    for row in intent_eval.read(args.datasets / "banking77" / "train.csv"):
        by_intent.setdefault(row["category"], []).append(row["text"])
    rng = random.Random("timing")
    categories, queries = [], []
    for name in sorted(by_intent):
        texts = by_intent[name][:]
        rng.shuffle(texts)
        categories.append(IntentCategory(name, "", texts[:10]))
        queries += texts[10:30]
    vectors = embedder.embed(queries)
    embedder.save()
    variants = {"product": IntentClassifier.build(categories, embedder)}
    for weight in args.weights:
        if weight:
            started = time.perf_counter()
            variants[f"lexical {weight}"] = LexicalClassifier.build(categories, embedder, weight=weight)
            print(
                f"classifier + lexicon build (uncached phrases embedded): {(time.perf_counter() - started) * 1000:.0f} ms"
            )
    times: dict[str, list[float]] = {name: [] for name in variants}
    for vector, text in zip(vectors, queries, strict=True):
        for name, classifier in variants.items():
            started = time.perf_counter()
            intent_eval._decide(classifier, vector, text)
            times[name].append((time.perf_counter() - started) * 1000)
    for name, values in times.items():
        print(
            f"{name}: ms per classification p50 {intent_eval.pct(values, 50):.3f} "
            f"p95 {intent_eval.pct(values, 95):.3f} ({len(values)} messages)"
        )


def _with(args: argparse.Namespace, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


if __name__ == "__main__":
    main()
