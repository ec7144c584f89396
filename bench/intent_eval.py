"""Intent classification on BANKING77: accuracy, confusions, calibration, out of scope, speed.

    python bench/intent_eval.py [--datasets ../shared/datasets] [--held-out 10]

Offline classifier path (``agent.classify``, no LLM): categories are built from
``train_10shot.csv`` and ``train_5shot.csv`` (the examples, no descriptions), evaluated on
``test.csv``. Prints accuracy, the top confusions, a reliability table (accuracy per confidence
bin and the expected calibration error), ms per classification (p50/p95), and, with some
categories held out of the agent, how often their test messages are called out of scope (intent
None, or confidence below the default threshold 0.5) and what that costs the in-scope accuracy.
"""

from __future__ import annotations

import argparse
import collections
import csv
import os
import random
import sys
import time
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
    from agentflow import IntentCategory

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument(
        "--held-out", type=int, default=10, help="categories left out for the out-of-scope test"
    )
    args = parser.parse_args()
    import django

    django.setup()

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
