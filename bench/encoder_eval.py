"""Sentence encoders side by side: intent accuracy and CPU per message, for each installed backend.

    python bench/encoder_eval.py [--encoders minilm,e5-small,paraphrase-l3] [--datasets ../shared/datasets]
                                 [--speed-messages 200] [--speed-only]

For every name in ``agentflow.embeddings.EMBEDDERS`` (or the ones given) whose package is installed
(the others are listed as skipped, with the reason): the load time, BANKING77 accuracy of the
offline intent classifier built from ``train_10shot.csv`` and ``train_5shot.csv`` and evaluated on
``test.csv`` (as ``bench/intent_eval.py`` does, but with the encoder given directly, so a
768-dimensional model can be measured although the database refuses it), and the process CPU time
per message embedded one at a time and in batches of 64 (one inference thread, as in the worker;
the first messages are a warm-up). Ends with one table.

The thread scorer is not measured here: its weights were fitted on MiniLM vectors
(conversations/data/thread_model.json), so another encoder needs ``bench/train_thread_model.py``
first (docs/configuration.md, "Sentence encoder").
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ.setdefault("AGENTFLOW_LOG_LEVEL", "WARNING")


def embed_all(embedder, texts: list[str], batch: int = 64):
    import numpy as np

    return np.concatenate([embedder.embed(texts[i : i + batch]) for i in range(0, len(texts), batch)])


def accuracy(embedder, train, test, vectors) -> float:
    from intent_eval import categories_from

    from intents.classifier import IntentClassifier

    classifier = IntentClassifier.build(categories_from(train), embedder)
    hits = [classifier.classify(v).intent == row["category"] for v, row in zip(vectors, test, strict=True)]
    return sum(hits) / len(hits)


def cpu_per_message(embedder, texts: list[str], batch: int) -> tuple[float, float]:
    """(CPU ms, wall ms) per message, embedding ``texts`` ``batch`` at a time after a warm-up."""
    embedder.embed(texts[:batch])
    cpu, wall = time.process_time(), time.perf_counter()
    for start in range(0, len(texts), batch):
        embedder.embed(texts[start : start + batch])
    return (
        (time.process_time() - cpu) * 1000 / len(texts),
        (time.perf_counter() - wall) * 1000 / len(texts),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--encoders", default="", help="comma-separated names (default: all known)")
    parser.add_argument("--speed-messages", type=int, default=200)
    parser.add_argument("--speed-only", action="store_true", help="skip the accuracy runs")
    args = parser.parse_args()
    import django

    django.setup()
    from django.utils.module_loading import import_string
    from intent_eval import read

    from agentflow.embeddings import EMBEDDERS, EmbedderUnavailable, resolve_embedder

    folder = args.datasets / "banking77"
    test = read(folder / "test.csv")
    shots = {n: read(folder / f"train_{n}shot.csv") for n in ("10", "5")}
    speed_texts = [row["text"] for row in test[: args.speed_messages]]
    names = [n.strip() for n in args.encoders.split(",") if n.strip()] or list(EMBEDDERS)
    load = os.getloadavg()
    print(f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f} on {os.cpu_count()} cores")
    rows = []
    for name in names:
        try:
            started = time.perf_counter()
            embedder = import_string(resolve_embedder(name))()
            loaded = time.perf_counter() - started
        except EmbedderUnavailable as exc:
            print(f"\n{name}: skipped: {exc}")
            continue
        print(f"\n{name} ({embedder.model_id}, {embedder.dimensions} dims): loaded in {loaded:.1f} s")
        scores = {"10": float("nan"), "5": float("nan")}
        if not args.speed_only:
            vectors = embed_all(embedder, [row["text"] for row in test])
            scores = {n: accuracy(embedder, train, test, vectors) for n, train in shots.items()}
            print(
                f"  BANKING77 10-shot {scores['10']:.4f}  5-shot {scores['5']:.4f} ({len(test)} test messages)"
            )
        single = cpu_per_message(embedder, speed_texts, 1)
        batched = cpu_per_message(embedder, speed_texts, 64)
        print(f"  one at a time: {single[0]:.2f} ms CPU / {single[1]:.2f} ms wall per message")
        print(f"  batches of 64: {batched[0]:.2f} ms CPU / {batched[1]:.2f} ms wall per message")
        rows.append((name, embedder.dimensions, scores["10"], scores["5"], single[0], batched[0]))
    print(
        "\n| encoder | dims | BANKING77 10-shot | 5-shot | CPU ms/message, single | CPU ms/message, batch 64 |"
    )
    print("|---|---|---|---|---|---|")
    for name, dims, ten, five, one, many in rows:
        print(f"| {name} | {dims} | {ten:.4f} | {five:.4f} | {one:.2f} | {many:.2f} |")


if __name__ == "__main__":
    main()
