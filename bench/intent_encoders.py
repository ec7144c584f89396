"""The intent classifier on vectors from several encoders, including ones the database cannot hold.

    python bench/intent_encoders.py --texts TEXTS.json
    python bench/intent_encoders.py --embed minilm --texts TEXTS.json OUT.npz
    python bench/intent_encoders.py VECTORS.npz [VECTORS.npz ...] [--datasets ../shared/datasets]
        [--test-only] [--sweep] [--out-of-scope 0.20] [--full-confidence 0.45]

Each ``.npz`` holds ``texts`` and ``vectors`` (one row per text, unit length, any dimension; also
``name``): precomputed by whatever runs the encoder, possibly in another virtualenv (a 768-dimensional
model such as all-mpnet-base-v2 needs PyTorch, which AgentFlow does not install). For each file it
prints BANKING77 test accuracy of ``intents.classifier.IntentClassifier`` built from the 10- and
5-shot examples (as ``bench/intent_eval.py`` does) and the intent-group folds of ``bench/intent_eval.py
--folds`` (same sizes, seeds and threshold 0.5, on ``train.csv`` only), then one summary table. The
files must hold every text those read (``banking77/*.csv``, the category names in words, and the
SGD/TIAGE openings; ``--texts`` alone writes that list as JSON); a missing one is an error naming
it. ``--test-only`` skips the folds (a file with the BANKING77 test and shot texts only).
``--embed NAME`` writes the vectors of one of AgentFlow's own encoders (``minilm``, ...) for the
texts file, so that all files hold the same texts.

``--out-of-scope`` / ``--full-confidence`` set the classifier's ``OUT_OF_SCOPE_SIMILARITY`` and
``FULL_CONFIDENCE_SIMILARITY`` for every file (another encoder's cosine scale may want other values).
``--sweep`` chooses them on the folds only (never on test.csv): it runs the folds over a grid of
pairs and prints, for each, the fold means of in-scope answered right, out of scope caught and other
domains caught.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")


class _NoEncoder:
    """The inner encoder of ``StoredVectors``: every text must be in the file."""

    def __init__(self, name: str) -> None:
        self.name = name

    def embed(self, texts: Sequence[str]):
        raise SystemExit(
            f"intent_encoders: {self.name} has no vector for {texts[0]!r} ({len(texts)} missing)"
        )


def _stored_vectors_class():
    """``StoredVectors``, built on ``intent_eval.CachedEmbedder`` (its ``embed``, ``embed_one`` and
    ``save``) once ``bench/`` is on the path."""
    from intent_eval import CachedEmbedder

    class StoredVectors(CachedEmbedder):
        """An embedder that answers from a file of precomputed vectors (any dimension)."""

        def __init__(self, path: Path) -> None:  # loads no encoder, unlike the parent
            import numpy as np

            stored = np.load(path, allow_pickle=False)
            vectors = stored["vectors"].astype(np.float32)
            self.name = str(stored["name"]) if "name" in stored else path.stem
            self.model_id = self.name
            self.graph = ""
            self.path = None  # never written back
            self.dimensions = int(vectors.shape[1])
            self.inner = _NoEncoder(self.name)
            self.vectors = dict(zip(stored["texts"].tolist(), vectors, strict=True))

    return StoredVectors


def test_accuracy(embedder: Any, datasets: Path) -> dict[str, float]:
    from intent_eval import categories_from, read

    from intents.classifier import IntentClassifier

    folder = datasets / "banking77"
    test = read(folder / "test.csv")
    vectors = embedder.embed([row["text"] for row in test])
    scores = {}
    for shots in ("10", "5"):
        classifier = IntentClassifier.build(
            categories_from(read(folder / f"train_{shots}shot.csv")), embedder
        )
        hits = [
            classifier.classify(v).intent == row["category"] for v, row in zip(vectors, test, strict=True)
        ]
        scores[shots] = sum(hits) / len(hits)
    return scores


def folds(embedder: Any, datasets: Path, quiet: bool) -> dict[str, float]:
    from intent_eval import run_folds

    args = argparse.Namespace(
        datasets=datasets, sizes=[20, 50, 77], seeds=3, shots=10, queries=25, threshold=0.5, cache=None
    )
    output = io.StringIO()
    with contextlib.redirect_stdout(output) if quiet else contextlib.nullcontext():
        figures = run_folds(args, embedder)
    keys = ("accuracy", "in-scope right", "out of scope caught", "other domains caught", "ECE")
    means = {key: statistics.fmean(f[key] for f in figures) for key in keys}
    means["accuracy sd"] = statistics.pstdev(f["accuracy"] for f in figures)
    means["accuracy 77"] = statistics.fmean(f["accuracy"] for f in figures if f["size"] == 77)
    return means


def needed_texts(datasets: Path) -> list[str]:
    from intent_eval import other_domain_messages, read

    texts: set[str] = set()
    for name in ("test", "train", "train_10shot", "train_5shot"):
        for row in read(datasets / "banking77" / f"{name}.csv"):
            texts |= {row["text"], row["category"].replace("_", " ").replace("?", "").lower()}
    return sorted(texts | set(other_domain_messages(datasets)))


def write_vectors(name: str, texts: list[str], out: Path) -> None:
    import numpy as np
    from django.utils.module_loading import import_string

    from agentflow.embeddings import resolve_embedder

    embedder = import_string(resolve_embedder(name))()
    vectors = np.concatenate([embedder.embed(texts[i : i + 64]) for i in range(0, len(texts), 64)])
    np.savez(out, texts=np.array(texts), vectors=vectors, name=np.array(f"{name} ({embedder.model_id})"))
    print(f"wrote {out}: {len(texts)} texts, {embedder.dimensions} dims")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="*", type=Path)
    parser.add_argument("--texts", type=Path, help="write (or, with --embed, read) the texts needed")
    parser.add_argument(
        "--embed", metavar="NAME", help="write NAME's vectors of --texts to the one file given"
    )
    parser.add_argument("--test-only", action="store_true", help="BANKING77 test accuracy only, no folds")
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--out-of-scope", type=float, default=None)
    parser.add_argument("--full-confidence", type=float, default=None)
    parser.add_argument("--sweep", action="store_true", help="choose the two similarities on the folds")
    args = parser.parse_args()
    import django

    django.setup()
    from intents import classifier

    if args.texts is not None and args.embed is None:
        args.texts.parent.mkdir(parents=True, exist_ok=True)
        args.texts.write_text(json.dumps(needed_texts(args.datasets)))
        print(f"wrote {args.texts}")
        return
    if args.embed is not None:
        if args.texts is None or len(args.files) != 1:
            parser.error("--embed needs --texts and one output file")
        write_vectors(args.embed, json.loads(args.texts.read_text()), args.files[0])
        return
    if not args.files:
        parser.error("give the vector files to compare")

    if args.out_of_scope is not None:
        classifier.OUT_OF_SCOPE_SIMILARITY = args.out_of_scope
    if args.full_confidence is not None:
        classifier.FULL_CONFIDENCE_SIMILARITY = args.full_confidence
    if not classifier.OUT_OF_SCOPE_SIMILARITY < classifier.FULL_CONFIDENCE_SIMILARITY:
        parser.error("--out-of-scope must be below --full-confidence")
    stored_vectors = _stored_vectors_class()
    embedders = [stored_vectors(path) for path in args.files]
    if args.sweep:
        for embedder in embedders:
            print(
                f"\n{embedder.name}: fold means (in-scope right / out of scope caught / other domains caught)"
            )
            for low in (0.15, 0.20, 0.25):
                for high in (0.40, 0.45, 0.50):
                    classifier.OUT_OF_SCOPE_SIMILARITY, classifier.FULL_CONFIDENCE_SIMILARITY = low, high
                    m = folds(embedder, args.datasets, quiet=True)
                    print(
                        f"  out of scope {low:.2f} full {high:.2f}: {m['in-scope right']:.4f} / "
                        f"{m['out of scope caught']:.4f} / {m['other domains caught']:.4f}  "
                        f"(mean of the first two {(m['in-scope right'] + m['out of scope caught']) / 2:.4f}, "
                        f"ECE {m['ECE']:.3f})",
                        flush=True,
                    )
        return
    rows = []
    for embedder in embedders:
        print(f"\n{embedder.name} ({embedder.dimensions} dims, {len(embedder.vectors)} texts)")
        scores = test_accuracy(embedder, args.datasets)
        print(f"  BANKING77 test: 10-shot {scores['10']:.4f}, 5-shot {scores['5']:.4f}")
        if args.test_only:
            rows.append((embedder, scores, None))
            continue
        means = folds(embedder, args.datasets, quiet=True)
        rows.append((embedder, scores, means))
        print(
            "  folds: accuracy {accuracy:.4f} ± {accuracy sd:.4f} (77 intents {accuracy 77:.4f}); in-scope right "
            "{in-scope right:.4f}; out of scope caught {out of scope caught:.4f}; other domains caught "
            "{other domains caught:.4f}; ECE {ECE:.3f}".format(**means)
        )
    print(
        f"\nthresholds: out of scope {classifier.OUT_OF_SCOPE_SIMILARITY}, full confidence "
        f"{classifier.FULL_CONFIDENCE_SIMILARITY}; folds at 0.5"
    )
    print(
        "| encoder | dims | BANKING77 10-shot | 5-shot | folds accuracy | 77 intents | in-scope right "
        "| out of scope caught | other domains caught | ECE |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for embedder, scores, m in rows:
        if m is None:
            print(
                f"| {embedder.name} | {embedder.dimensions} | {scores['10']:.4f} | {scores['5']:.4f} |"
                + " - |" * 6
            )
            continue
        print(
            f"| {embedder.name} | {embedder.dimensions} | {scores['10']:.4f} | {scores['5']:.4f} | "
            f"{m['accuracy']:.4f} ± {m['accuracy sd']:.4f} | {m['accuracy 77']:.4f} | {m['in-scope right']:.4f} | "
            f"{m['out of scope caught']:.4f} | {m['other domains caught']:.4f} | {m['ECE']:.3f} |"
        )


if __name__ == "__main__":
    main()
