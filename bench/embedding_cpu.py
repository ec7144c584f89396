"""CPU per embedding of the default MiniLM's two graphs, interleaved: fp32 (as shipped) and quantized.

    python bench/embedding_cpu.py [--rounds 4]

Embeds, one text per call as a turn does, (a) one 17-token sentence 200 times and (b) the 200 first
user turns of our support chats (bench/data/support_turns.jsonl, the typical length of a chat
message), with ``minilm-fp32`` and ``minilm`` in turn (A, B, A, B, ...), and prints the thread CPU
time per embedding of each round and the median. One inference thread (the worker's setting).
Also prints the lowest and mean cosine between the two graphs' vectors of those turns, and, over
all pairs of 800 texts (400 BANKING77 test messages and the support chats' turns; needs
``--datasets``), how the pairs' similarities move: the shift per band of fp32 similarity, the pairs
above retrieval thresholds under each graph, and how often a text keeps its nearest other text.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SENTENCE = "Can you book a table for two at 7pm tomorrow near the office?"


def cpu_ms(embedder, texts: list[str], repeat: int) -> float:
    for text in texts[:5]:
        embedder.embed([text])
    start = time.thread_time()
    for _ in range(repeat):
        for text in texts:
            embedder.embed([text])
    return (time.thread_time() - start) / (repeat * len(texts)) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(message)s")
    import numpy as np

    from agentflow.embeddings import MiniLMEmbedder, MiniLMFp32Embedder

    graphs = {"minilm-fp32": MiniLMFp32Embedder(), "minilm": MiniLMEmbedder()}
    print("graphs: " + ", ".join(f"{name} = {e.graph}" for name, e in graphs.items()))
    turns: list[str] = []
    for line in (ROOT / "bench" / "data" / "support_turns.jsonl").read_text().splitlines():
        turns += [t["utterance"] for t in json.loads(line)["turns"] if t["speaker"] == "USER"]
    turns = turns[:200]
    tokens = [len(graphs["minilm-fp32"]._tokenizer.encode(t).ids) for t in turns]
    print(
        f"{len(turns)} user turns, {statistics.median(tokens):.0f} tokens median ({min(tokens)}-{max(tokens)})"
    )
    figures: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.rounds):
        for name, embedder in graphs.items():
            figures.setdefault((name, "one sentence"), []).append(cpu_ms(embedder, [SENTENCE], 200))
            figures.setdefault((name, "support turns"), []).append(cpu_ms(embedder, turns, 1))
    for (name, what), values in sorted(figures.items(), key=lambda item: item[0][1]):
        rounds = " ".join(f"{v:.2f}" for v in values)
        print(
            f"  {what:14s} {name:12s} {rounds}  median {statistics.median(values):.2f} ms CPU per embedding"
        )
    a = np.concatenate([graphs["minilm-fp32"].embed([t]) for t in turns])
    b = np.concatenate([graphs["minilm"].embed([t]) for t in turns])
    cosines = np.sum(a * b, axis=1)
    print(f"cosine between the graphs on the turns: mean {cosines.mean():.4f}, lowest {cosines.min():.4f}")
    pairs(graphs, args.datasets / "banking77" / "test.csv")


def pairs(graphs: dict, banking_test: Path) -> None:
    import numpy as np

    if not banking_test.exists():
        print(f"(pairs skipped: no {banking_test})")
        return
    rows = list(csv.DictReader(banking_test.open()))
    texts = [row["text"] for row in random.Random(1).sample(rows, 400)]
    for line in (ROOT / "bench" / "data" / "support_turns.jsonl").read_text().splitlines():
        texts += [t["utterance"] for t in json.loads(line)["turns"]]
    texts = list(dict.fromkeys(texts))[:800]
    a = np.concatenate([graphs["minilm-fp32"].embed([t]) for t in texts])
    b = np.concatenate([graphs["minilm"].embed([t]) for t in texts])
    upper = np.triu_indices(len(texts), 1)
    sa, sb = (a @ a.T)[upper], (b @ b.T)[upper]
    shift = sb - sa
    print(f"{len(texts)} texts, {len(sa)} pairs: similarity quantized minus fp32")
    for low, high in ((0.0, 0.2), (0.2, 0.4), (0.4, 0.6), (0.6, 0.8), (0.8, 1.01)):
        band = (sa >= low) & (sa < high)
        print(
            f"  fp32 [{low:.1f}, {high:.1f}): {band.sum():7d} pairs, shift {shift[band].mean():+.4f} sd {shift[band].std():.4f}"
        )
    for threshold in (0.3, 0.5, 0.6, 0.7):
        above_a, above_b = sa >= threshold, sb >= threshold
        print(
            f"  at or above {threshold}: fp32 {above_a.sum()}, quantized {above_b.sum()} "
            f"({(above_a & ~above_b).sum()} fell below, {(above_b & ~above_a).sum()} rose above)"
        )
    sims_a, sims_b = a @ a.T - 3 * np.eye(len(texts)), b @ b.T - 3 * np.eye(len(texts))
    top_a, top_b = np.argsort(-sims_a, axis=1)[:, :5], np.argsort(-sims_b, axis=1)[:, :5]
    overlap = np.mean([len(set(x) & set(y)) / 5 for x, y in zip(top_a, top_b, strict=True)])
    print(
        f"  nearest other text unchanged {np.mean(top_a[:, 0] == top_b[:, 0]):.3f}; top-5 overlap {overlap:.3f}"
    )


if __name__ == "__main__":
    main()
