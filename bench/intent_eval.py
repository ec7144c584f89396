"""Intent classification on BANKING77: accuracy, confusions, calibration, out of scope, speed.

    python bench/intent_eval.py [--datasets ../shared/datasets] [--held-out 10]
    python bench/intent_eval.py --folds [--sizes 20,50,77] [--seeds 3] [--cache .data/intent_vectors.npz]
    python bench/intent_eval.py --sgd [--seeds 5] [--cache .data/intent_vectors.npz]

Offline classifier path (``agent.classify``, no LLM): categories are built from
``train_10shot.csv`` and ``train_5shot.csv`` (the examples, no descriptions), evaluated on
``test.csv``. Prints accuracy, the top confusions, a reliability table (accuracy per confidence
bin and the expected calibration error), ms per classification (p50/p95), and, with some
categories held out of the agent, how often their test messages are called out of scope (intent
None, or confidence below the default threshold 0.5) and what that costs the in-scope accuracy.

``--folds`` is the validation for choosing the classifier's settings, and it never reads
``test.csv``: each fold takes a random subset of intents (``--sizes``, so that sets of other sizes
than 77 are represented) and a fresh random 10-shot sample of ``train.csv`` (``--seeds`` samples per
size), and classifies up to ``--queries`` other ``train.csv`` rows of each intent. A fifth of the
fold's intents (a different group each seed) is then left out of a second classifier: their rows are
out of scope. Per fold it prints top-1 accuracy (all intents in scope), and at ``--threshold``
(default 0.5, the configuration's default) "in-scope answered right" (intent right and confidence at
least the threshold, over all in-scope rows), "out of scope caught" (intent None or confidence below
the threshold), "other domains caught" (the same, all intents in scope, for 400 opening messages of
the SGD and TIAGE folders: travel, media, chit-chat; banks excluded), the expected calibration
error of the in-scope confidences and ms per classification (embedding excluded: vectors are
cached, ``--cache`` keeps them between runs); then the mean, standard deviation and minimum of each
figure over all folds and per size.

``--sgd`` is a second, multi-domain validation set (travel, media, events, restaurants, banks...):
the user turns of the SGD dev dialogues that state an intent (``INFORM_INTENT``), labelled with the
SGD intent (FindMovies, ReserveRestaurant, ...); the 20 intents with at least 15 such turns, 10-shot
sampled ``--seeds`` times, every other turn classified; a fifth of the intents (rotating with the
seed) out of scope; TIAGE chit-chat openings as the other domain. Same figures as the folds.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import random
import statistics
import sys
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def categories_from(rows: list[dict[str, str]], keep: set[str] | None = None):
    from agentflow.types import IntentCategory

    grouped: dict[str, list[str]] = collections.defaultdict(list)
    for row in rows:
        if keep is None or row["category"] in keep:
            grouped[row["category"]].append(row["text"])
    return [IntentCategory(name, "", examples) for name, examples in sorted(grouped.items())]


def build_classifier(categories):
    from agentflow.embeddings import get_embedder
    from intents.classifier import IntentClassifier

    return IntentClassifier.build(categories, get_embedder())


def run(classifier, test: list[dict[str, str]]):
    from agentflow.embeddings import get_embedder

    embedder = get_embedder()
    results, timings = [], []
    for row in test:
        started = time.perf_counter()
        result = classifier.classify(embedder.embed_one(row["text"]))
        timings.append((time.perf_counter() - started) * 1000)
        results.append(result)
    return results, timings


def report(name: str, test, results, timings) -> None:
    gold = [row["category"] for row in test]
    correct = [r.intent == g for r, g in zip(results, gold, strict=True)]
    print(f"\n{name}: accuracy {sum(correct) / len(correct):.4f} on {len(correct)} test messages")
    confusions = collections.Counter(
        (g, r.intent) for r, g in zip(results, gold, strict=True) if r.intent != g
    )
    print("  top confusions (gold -> predicted: count):")
    for (g, p), count in confusions.most_common(6):
        print(f"    {g} -> {p}: {count}")
    print("  reliability (confidence bin: n, accuracy, mean confidence):")
    ece = 0.0
    for low in [0.0, 0.2, 0.4, 0.6, 0.8]:
        members = [
            (c, r.confidence)
            for c, r in zip(correct, results, strict=True)
            if low <= r.confidence < low + 0.2 + (low == 0.8)
        ]
        if not members:
            continue
        accuracy = sum(c for c, _ in members) / len(members)
        confidence = sum(p for _, p in members) / len(members)
        ece += len(members) / len(results) * abs(accuracy - confidence)
        print(f"    [{low:.1f}, {low + 0.2:.1f}): {len(members):5d}  {accuracy:.3f}  {confidence:.3f}")
    print(f"  expected calibration error {ece:.3f}")
    print(
        f"  ms per classification (embedding + classify): p50 {pct(timings, 50):.2f}  p95 {pct(timings, 95):.2f}"
    )


class CachedEmbedder:
    """The process's embedder with every vector kept (and, with a path, saved for the next run)."""

    def __init__(self, path: Path | None) -> None:
        import numpy as np

        from agentflow.embeddings import get_embedder

        self.inner = get_embedder()
        self.dimensions = self.inner.dimensions
        self.model_id = self.inner.model_id
        # The default MiniLM runs a quantized copy of the graph under the same model id; vectors of
        # the fp32 graph (minilm-fp32) must not be reused for it, nor the other way round.
        self.graph = str(getattr(self.inner, "graph", ""))
        self.path = path
        self.vectors: dict[str, np.ndarray] = {}
        if path is not None and path.exists():
            try:
                stored = np.load(path, allow_pickle=False)
                stored_graph = str(stored["graph"]) if "graph" in stored else ""
                if str(stored["model_id"]) == self.model_id and stored_graph == self.graph:
                    self.vectors = dict(zip(stored["texts"].tolist(), stored["vectors"], strict=True))
            except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
                print(
                    f"intent_eval: ignoring the unreadable cache {path} ({error}); it is rebuilt",
                    file=sys.stderr,
                )

    def embed(self, texts: Sequence[str]):
        import numpy as np

        missing = sorted({t for t in texts if t not in self.vectors})
        for start in range(0, len(missing), 64):
            chunk = missing[start : start + 64]
            self.vectors.update(zip(chunk, self.inner.embed(chunk), strict=True))
        if not texts:
            return np.zeros((0, self.dimensions), dtype=np.float32)
        return np.stack([self.vectors[t] for t in texts])

    def embed_one(self, text: str):
        return self.embed([text])[0]

    def save(self) -> None:
        import numpy as np

        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        texts = sorted(self.vectors)
        np.savez(
            self.path,
            model_id=np.array(self.model_id),
            graph=np.array(self.graph),
            texts=np.array(texts),
            vectors=np.stack([self.vectors[t] for t in texts]),
        )


def sizes(raw: str) -> list[int]:
    try:
        return [int(part) for part in raw.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {raw!r}") from None


def calibration_error(correct: list[bool], confidences: list[float]) -> float:
    error = 0.0
    for low in (0.0, 0.2, 0.4, 0.6, 0.8):
        members = [
            (c, p) for c, p in zip(correct, confidences, strict=True) if low <= p < low + 0.2 + (low == 0.8)
        ]
        if members:
            accuracy = sum(c for c, _ in members) / len(members)
            confidence = sum(p for _, p in members) / len(members)
            error += len(members) / len(correct) * abs(accuracy - confidence)
    return error


def other_domain_messages(datasets: Path, count: int = 400) -> list[str]:
    """Opening user messages of other domains (SGD services but banks, TIAGE chit-chat), if present."""
    import json

    sources = [
        (datasets / "sgd_threads" / "dev.jsonl", 3 * count // 4),
        (datasets / "tiage_threads" / "train.jsonl", count // 4),
    ]
    messages: list[str] = []
    for path, share in sources:
        if not path.is_file():
            continue
        found = set()
        for line in path.read_text().splitlines():
            for turn in json.loads(line)["turns"]:
                if turn.get("label") in ("FIRST", "NEW_TOPIC") and not (turn.get("service") or "").startswith(
                    "Banks"
                ):
                    found.add(turn["utterance"])
        messages += random.Random(13).sample(sorted(found), min(share, len(found)))
    return messages


def _decide(classifier, vector, text: str):
    """The product's classifier reads the embedding only; an experimental one (``build``) may read
    the text too (``bench/intent_lexical.py``)."""
    if isinstance(classifier, _product_classifier()):
        return classifier.classify(vector)
    return classifier.classify(vector, text=text)


def _product_classifier():
    from intents.classifier import IntentClassifier

    return IntentClassifier


def evaluate_fold(
    categories,
    queries: list[tuple[str, str]],
    held: set[str],
    others: list[str],
    embedder,
    threshold: float,
    build=None,
) -> tuple[dict[str, float], list[float]]:
    """One fold: accuracy with every category in scope; then with the ``held`` ones left out, in-scope
    answered right and out of scope caught; other domains' messages caught; the in-scope ECE; and the
    ms per classification (embedding excluded). ``build(categories, embedder)`` makes the classifier
    (default: the product's ``IntentClassifier.build``)."""
    build = build or _product_classifier().build
    vectors = embedder.embed([text for text, _ in queries])
    other_vectors = embedder.embed(others)
    classifier = build(categories, embedder)
    fold_times, results = [], []
    for vector, (text, _) in zip(vectors, queries, strict=True):
        started = time.perf_counter()
        results.append(_decide(classifier, vector, text))
        fold_times.append((time.perf_counter() - started) * 1000)
    correct = [r.intent == gold for r, (_, gold) in zip(results, queries, strict=True)]
    far = [_decide(classifier, vector, text) for vector, text in zip(other_vectors, others, strict=True)]
    far_caught = sum(r.intent is None or r.confidence < threshold for r in far) / max(1, len(far))
    ece = calibration_error(correct, [r.confidence for r in results])
    reduced = build([c for c in categories if c.name not in held], embedder)
    inside = outside = right = caught = 0
    for vector, (text, gold) in zip(vectors, queries, strict=True):
        result = _decide(reduced, vector, text)
        confident = result.intent is not None and result.confidence >= threshold
        if gold in held:
            outside += 1
            caught += not confident
        else:
            inside += 1
            right += confident and result.intent == gold
    fold = {
        "accuracy": sum(correct) / len(correct),
        "in-scope right": right / inside,
        "out of scope caught": caught / outside,
        "other domains caught": far_caught if others else float("nan"),
        "ECE": ece,
    }
    return fold, fold_times


def print_fold(size: int, seed: int, fold: dict[str, float], fold_times: list[float]) -> None:
    print(
        f"  {size:4d} {seed:4d}  {fold['accuracy']:.4f}    {fold['in-scope right']:.4f}          "
        f"{fold['out of scope caught']:.4f}               "
        f"{fold['other domains caught']:.4f}                {fold['ECE']:.3f}  "
        f"{pct(fold_times, 50):.2f}/{pct(fold_times, 95):.2f}"
    )


HEADER = "  size seed  accuracy  in-scope right  out of scope caught  other domains caught  ECE    ms p50/p95"


def print_aggregate(figures: list[dict[str, float]], groups: list[int], timings: list[float]) -> None:
    print("aggregate (mean / std / min):")
    for label, members in [
        ("all", figures),
        *((f"size {s}", [f for f in figures if f["size"] == s]) for s in groups),
    ]:
        parts = []
        for key in ("accuracy", "in-scope right", "out of scope caught", "other domains caught", "ECE"):
            values = [f[key] for f in members if f[key] == f[key]]  # NaN: not measured
            if not values:
                continue
            spread = statistics.pstdev(values) if len(values) > 1 else 0.0
            parts.append(f"{key} {statistics.fmean(values):.4f} / {spread:.4f} / {min(values):.4f}")
        print(f"  {label}: " + "; ".join(parts))
    print(
        f"  ms per classification (embedding excluded): p50 {pct(timings, 50):.2f}  p95 {pct(timings, 95):.2f}"
    )


def few_shot_fold(
    by_intent: dict[str, list[str]],
    names: list[str],
    rng: random.Random,
    shots: int,
    queries: int | None,
    seed: int,
    *,
    group_seed: str,
):
    """One fold over ``names``: ``shots`` examples an intent (shuffled by ``rng``) as the categories, up to
    ``queries`` other rows an intent to classify (None: all the others), and a fifth of the intents (shuffled by ``group_seed``,
    rotating with ``seed``) to leave out as out of scope. Returns (categories, queries, held-out names)."""
    from agentflow.types import IntentCategory

    examples: dict[str, list[str]] = {}
    asked: list[tuple[str, str]] = []
    for name in names:
        texts = by_intent[name][:]
        rng.shuffle(texts)
        examples[name] = texts[:shots]
        asked += [(text, name) for text in texts[shots : None if queries is None else shots + queries]]
    categories = [IntentCategory(name, "", examples[name]) for name in names]
    order = names[:]
    random.Random(group_seed).shuffle(order)
    group_size = max(1, len(names) // 5)
    start = (seed * group_size) % len(names)
    return categories, asked, set((order + order)[start : start + group_size])


def run_folds(args, embedder=None, build=None) -> list[dict[str, float]]:
    """The folds (see above), printed; returns each fold's figures. ``embedder``: vectors from elsewhere
    (``bench/intent_encoders.py`` passes precomputed ones), else the process's, cached in ``args.cache``;
    ``build``: another classifier (see ``evaluate_fold``)."""

    path = args.datasets / "banking77" / "train.csv"
    if not path.is_file():
        raise SystemExit(f"intent_eval: no {path} (--datasets names the folder holding banking77/)")
    rows = read(path)
    by_intent: dict[str, list[str]] = collections.defaultdict(list)
    for row in rows:
        by_intent[row["category"]].append(row["text"])
    names = sorted(by_intent)
    if max(args.sizes) > len(names):
        raise SystemExit(
            f"intent_eval: --sizes {max(args.sizes)} is more than the {len(names)} intents in {path}"
        )
    thin = sorted(n for n in names if len(by_intent[n]) <= args.shots)
    if thin:
        raise SystemExit(
            f"intent_eval: intents {', '.join(thin[:5])} have no rows left to classify after {args.shots} examples"
        )
    if embedder is None:
        embedder = CachedEmbedder(args.cache)
    others = other_domain_messages(args.datasets)
    figures: list[dict[str, float]] = []
    timings: list[float] = []
    print(
        f"folds: sizes {args.sizes}, {args.seeds} random {args.shots}-shot samples of train.csv each, "
        f"up to {args.queries} queries an intent, threshold {args.threshold}; "
        f"{len(others)} messages of other domains"
    )
    print(HEADER)
    for size in args.sizes:
        for seed in range(args.seeds):
            rng = random.Random(f"{size}-{seed}")
            chosen = sorted(rng.sample(names, size))
            categories, queries, held = few_shot_fold(
                by_intent, chosen, rng, args.shots, args.queries, seed, group_seed=f"group-{size}"
            )
            fold, fold_times = evaluate_fold(
                categories, queries, held, others, embedder, args.threshold, build
            )
            figures.append({"size": size, **fold})
            timings += fold_times
            print_fold(size, seed, fold, fold_times)
    embedder.save()
    print_aggregate(figures, args.sizes, timings)
    return figures


def sgd_intents(datasets: Path) -> dict[str, list[str]]:
    """User turns of the SGD dev dialogues that state an intent (acts include INFORM_INTENT), by the
    SGD intent (FindMovies, ReserveRestaurant, ...); a text seen twice keeps its first intent."""
    import json

    path = datasets / "sgd_threads" / "dev.jsonl"
    if not path.is_file():
        raise SystemExit(f"intent_eval: no {path} (--datasets names the folder holding sgd_threads/)")
    by_intent: dict[str, list[str]] = collections.defaultdict(list)
    seen: set[str] = set()
    for line in path.read_text().splitlines():
        for turn in json.loads(line)["turns"]:
            text = turn.get("utterance", "")
            if (
                turn.get("speaker") == "USER"
                and "INFORM_INTENT" in (turn.get("acts") or [])
                and text not in seen
            ):
                seen.add(text)
                by_intent[turn["intent"]].append(text)
    return by_intent


def chit_chat_messages(datasets: Path, count: int = 400) -> list[str]:
    """Opening messages of the TIAGE chit-chat dialogues: out of every SGD service's scope."""
    import json

    path = datasets / "tiage_threads" / "train.jsonl"
    if not path.is_file():
        return []
    found = {
        turn["utterance"]
        for line in path.read_text().splitlines()
        for turn in json.loads(line)["turns"]
        if turn.get("label") in ("FIRST", "NEW_TOPIC")
    }
    return random.Random(13).sample(sorted(found), min(count, len(found)))


def run_sgd(args, embedder=None, build=None) -> list[dict[str, float]]:
    """A multi-domain proxy: SGD intents (travel, media, events, restaurants, ...) with ``args.shots``
    random examples each (``args.seeds`` samples), every other turn of the intent classified. Intents
    with fewer than ``args.shots`` + 5 turns are left out. A fifth of the intents (rotating with the
    seed) is left out of a second classifier for out of scope; chit-chat openings are the other domain."""
    by_intent = {n: t for n, t in sgd_intents(args.datasets).items() if len(t) >= args.shots + 5}
    names = sorted(by_intent)
    if len(names) < 2:
        raise SystemExit(
            f"intent_eval: fewer than 2 SGD intents have {args.shots + 5} turns stating them "
            f"({args.shots} examples + 5 to classify)"
        )
    if embedder is None:
        embedder = CachedEmbedder(args.cache)
    others = chit_chat_messages(args.datasets)
    figures: list[dict[str, float]] = []
    timings: list[float] = []
    rows = sum(len(t) for t in by_intent.values())
    print(
        f"SGD proxy: {len(names)} intents, {rows} turns, {args.seeds} random {args.shots}-shot samples, "
        f"threshold {args.threshold}; {len(others)} chit-chat messages"
    )
    print(HEADER)
    for seed in range(args.seeds):
        rng = random.Random(f"sgd-{seed}")
        categories, queries, held = few_shot_fold(
            by_intent, names, rng, args.shots, None, seed, group_seed="sgd-group"
        )
        fold, fold_times = evaluate_fold(categories, queries, held, others, embedder, args.threshold, build)
        figures.append({"size": len(names), **fold})
        timings += fold_times
        print_fold(len(names), seed, fold, fold_times)
    embedder.save()
    print_aggregate(figures, [], timings)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument(
        "--held-out", type=int, default=10, help="categories left out for the out-of-scope test"
    )
    parser.add_argument("--folds", action="store_true", help="validation folds on train.csv (see above)")
    parser.add_argument(
        "--sgd", action="store_true", help="the multi-domain proxy: SGD dev intents, 10-shot (see run_sgd)"
    )
    parser.add_argument(
        "--sizes",
        type=sizes,
        default=[20, 50, 77],
        help="intents per fold, comma-separated",
    )
    parser.add_argument("--seeds", type=int, default=3, help="random samples per size")
    parser.add_argument("--shots", type=int, default=10, help="examples per intent")
    parser.add_argument("--queries", type=int, default=25, help="train rows classified per intent")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument(
        "--cache", type=Path, default=None, help="an .npz file keeping the vectors between runs"
    )
    args = parser.parse_args()
    if min(args.sizes) < 2:
        parser.error("--sizes: each fold needs at least 2 intents")
    if args.seeds < 1 or args.shots < 1 or args.queries < 1:
        parser.error("--seeds, --shots and --queries must be at least 1")
    if not 0.0 <= args.threshold <= 1.0:
        parser.error("--threshold must be between 0 and 1")
    import django

    django.setup()
    if args.folds or args.sgd:
        if args.folds:
            run_folds(args)
        if args.sgd:
            run_sgd(args)
        return

    folder = args.datasets / "banking77"
    test = read(folder / "test.csv")
    timed = []
    for shots in ("10", "5"):
        train = read(folder / f"train_{shots}shot.csv")
        classifier = build_classifier(categories_from(train))
        results, timings = run(classifier, test)
        report(f"BANKING77 {shots}-shot", test, results, timings)
        timed.append(timings)

    # Out of scope: leave some categories out of the agent; their messages should not get an intent.
    train = read(folder / "train_10shot.csv")
    names = sorted({row["category"] for row in train})
    held = set(random.Random(13).sample(names, args.held_out))
    classifier = build_classifier(categories_from(train, keep=set(names) - held))
    results, _ = run(classifier, test)
    outside = [r for r, row in zip(results, test, strict=True) if row["category"] in held]
    inside = [(r, row) for r, row in zip(results, test, strict=True) if row["category"] not in held]
    none_rate = sum(r.intent is None for r in outside) / len(outside)
    below = sum(r.intent is None or r.confidence < 0.5 for r in outside) / len(outside)
    accuracy = sum(r.intent == row["category"] for r, row in inside) / len(inside)
    kept = [(r, row) for r, row in inside if r.intent is not None and r.confidence >= 0.5]
    print(f"\nout of scope ({args.held_out} of 77 categories held out, 10-shot):")
    print(f"  held-out messages with intent None: {none_rate:.3f}; None or confidence < 0.5: {below:.3f}")
    print(
        f"  in-scope accuracy {accuracy:.4f}; in-scope messages kept at confidence >= 0.5: {len(kept) / len(inside):.3f}"
        f" (accuracy among them {sum(r.intent == row['category'] for r, row in kept) / max(1, len(kept)):.4f})"
    )


if __name__ == "__main__":
    main()
