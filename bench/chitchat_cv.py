"""The chitchat profile cross-validated through its own thread bookkeeping (TIAGE train, 5 folds by dialogue).

Each fold's new-topic scorer is trained (``bench/train_thread_model.py``'s examples, the shipped
setting: L2 0.03, embedding x10) on the other four folds' dialogues, then the fold's dialogues are
replayed through the real ``decide_thread`` on the threads it builds itself: a pure-Python copy of the
pipeline's bookkeeping (open / add / resolve / reopen, the 10 open + 3 resolved candidates, the
running-mean topic, the last 300 words), as ``Agent.detect_thread`` does through the database. Every
TIAGE turn is a user turn and arrives at once (no dormancy).

``--resolution`` compares how the chitchat profile resolves: ``scorer`` (the task profile's resolution
scorer alone: what ships), ``farewell`` (only a farewell may resolve) or ``never`` (both measured, not
shipped). Per variant and threshold it prints NEW_TOPIC F1 per fold (mean ± sd [min, max]), the turns
placed as RESOLUTION, F1 with each fold's threshold chosen on the other four, and which turns a variant
changed against ``scorer``. ``--dev`` also replays TIAGE dev with the shipped scorer (a second check,
never used to choose). ``--replayed-rows`` also trains each fold's scorer on the states the pipeline
builds itself (the other folds replayed, nested). ``--similarity last topic diff`` appends a learned
similarity (measured, not shipped): the element-wise product of the message's embedding with the last
turn's (``last``) and with the thread's unit topic (``topic``), and/or the absolute difference from the
last turn (``diff``), and/or the last turn's own unit embedding (``prev``), 384 inputs each, their L2 ``--similarity-factor`` times the hand features'; with
``--project K``, reduced to K principal directions fitted on each fold's training rows only. With
``--dev`` and a feature set the shipped model does not read, dev is replayed with a scorer fitted on all
of TIAGE train (with ``--replayed-rows``: plus each train fold replayed, as the training script does).
``--fold-seed N`` deals the dialogues to the folds in a shuffled order (default: dialogue i to fold i % 5),
to see whether a gain holds on another split.

    python bench/chitchat_cv.py --cache /tmp/tiage.npz [--dev] [--replayed-rows] [--thresholds 0.25 0.275 ...]
        [--similarity last [topic] [diff] [--similarity-factor 30] [--project 32]]
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")

from conversations.thread_features import ThreadModel, ThreadState  # noqa: E402  (after the path)

FOLDS = 5
L2, EMBEDDING_FACTOR = 0.03, 10.0
THRESHOLDS = np.round(np.arange(0.2, 0.401, 0.025), 3)
OPEN_LIMIT, RESOLVED_LIMIT, VOCABULARY_LIMIT = 10, 3, 300


class Thread:
    def __init__(self, key: int, text: str, v: np.ndarray, clock: int) -> None:
        from conversations.thread_features import content_words

        self.key, self.clock, self.resolved = key, clock, False
        self.words = sorted(content_words(text))
        self.state = ThreadState(v, v, v.copy(), set(self.words), "", 1)

    def add(self, text: str, v: np.ndarray, clock: int) -> None:
        from conversations.thread_features import content_words

        s = self.state
        s.centroid = (s.centroid * s.user_turns + v) / (s.user_turns + 1)
        s.user_turns += 1
        s.last_user = v
        self.words = list(dict.fromkeys([*self.words, *sorted(content_words(text))]))[-VOCABULARY_LIMIT:]
        s.vocabulary = set(self.words)
        self.clock, self.resolved = clock, False

    def resolve(self, v: np.ndarray, clock: int) -> None:
        self.state.last_user = v
        self.clock, self.resolved = clock, True


# Only a farewell ends a chit-chat thread (the ``farewell`` variant; not shipped, see docs/operations.md).
FAREWELL = re.compile(
    r"\b(bye|goodbye|good ?night|see (you|ya)|talk (to you )?(later|soon)|ttyl|(gotta|got to|have to|need to"
    r"|must) (go|run|leave)|take care|(nice|good|great) (talking|chatting) (to|with) you"
    r"|have a (good|great|nice|lovely) (day|night|evening|one|weekend))\b",
    re.IGNORECASE,
)
RESOLVES = {"scorer": re.compile(""), "farewell": FAREWELL, "never": re.compile(r"(?!)")}


@dataclass(frozen=True)
class GatedModel(ThreadModel):
    """The profile's model, its P(resolution) set to 0 for a message ``resolves`` does not match: the
    same placements as a veto of the resolution in ``decide_thread``."""

    resolves: re.Pattern = RESOLVES["scorer"]
    text: list = field(default_factory=lambda: [""])

    def features(self, text: str, embedding: np.ndarray, state: ThreadState) -> np.ndarray:
        self.text[0] = text
        return super().features(text, embedding, state)

    def score(self, features: np.ndarray) -> tuple[float, float]:
        p_new, p_res = super().score(features)
        return p_new, p_res if self.resolves.search(self.text[0]) else 0.0


def _unit(v: np.ndarray) -> np.ndarray:
    n = float(np.linalg.norm(v))
    return v / n if n else v


# The projection in use for --project (set per fold: fitted on that fold's training rows only).
PROJECTION: dict[str, np.ndarray] = {}


def similarity_raw(kinds: tuple[str, ...], embedding: np.ndarray, state: ThreadState) -> np.ndarray:
    e = embedding.astype(np.float32)
    parts = {
        "last": lambda: e * _unit(state.last_user).astype(np.float32),
        "topic": lambda: e * _unit(state.centroid).astype(np.float32),
        "diff": lambda: np.abs(e - _unit(state.last_user).astype(np.float32)),
        "prev": lambda: _unit(state.last_user).astype(np.float32),
    }
    return np.concatenate([parts[k]() for k in kinds])


def register_similarity(kinds: tuple[str, ...]) -> str:
    """A feature set "the chitchat features + the learned-similarity inputs" (projected when PROJECTION
    holds a matrix); returns its key in FEATURES."""
    from conversations.thread_features import FEATURES, chitchat_features

    def features(text: str, embedding: np.ndarray, state: ThreadState) -> np.ndarray:
        raw = similarity_raw(kinds, embedding, state)
        if "matrix" in PROJECTION:
            raw = (raw - PROJECTION["center"]) @ PROJECTION["matrix"]
        return np.concatenate([chitchat_features(text, embedding, state), raw.astype(np.float32)])

    key = "chitchat+" + "+".join(kinds)
    FEATURES[key] = features
    return key


def candidates(threads: list[Thread]):
    from conversations.thread_detection import Candidate

    now = datetime(2026, 1, 1, tzinfo=UTC)
    resolved = sorted((t for t in threads if t.resolved), key=lambda t: -t.clock)[:RESOLVED_LIMIT]
    open_ = sorted((t for t in threads if not t.resolved), key=lambda t: -t.clock)[:OPEN_LIMIT]
    ordered = sorted(open_ + resolved, key=lambda t: -t.clock)
    return [Candidate(t.key, t.state, now, resolved=t.resolved) for t in ordered]


def replay(
    dialogues: list[dict], vectors: dict, model, features: list | None = None, timings: list | None = None
) -> tuple[list[bool], list[str], list[tuple]]:
    """Gold NEW_TOPIC and the placed event of every turn after the first; (dialogue, text, gold, event)
    rows. ``features`` collects each scored turn's features against the active thread it was put to;
    ``timings`` the CPU seconds of each ``decide_thread`` call."""
    import time

    from conversations.thread_detection import decide_thread

    now = datetime(2026, 1, 1, tzinfo=UTC)
    gold, events, rows = [], [], []
    for dialogue in dialogues:
        threads: list[Thread] = []
        for clock, turn in enumerate(dialogue["turns"]):
            text, v = turn["utterance"], vectors[turn["utterance"]]
            if features is not None and threads and turn["label"] != "FIRST":
                features.append(model.features(text, v, candidates(threads)[0].state))
            offered = candidates(threads)
            started = time.process_time()
            decision = decide_thread(
                text=text,
                embedding=v,
                candidates=offered,
                now=now,
                inactivity=timedelta(minutes=30),
                model=model,
            )
            if timings is not None:
                timings.append(time.process_time() - started)
            by_key = {t.key: t for t in threads}
            if decision.thread_id is None:
                threads.append(Thread(len(threads), text, v, clock))
            elif decision.event == "RESOLUTION":
                by_key[decision.thread_id].resolve(v, clock)
            else:
                by_key[decision.thread_id].add(text, v, clock)
            if turn["label"] != "FIRST":
                gold.append(turn["label"] == "NEW_TOPIC")
                events.append(decision.event)
                rows.append((dialogue["dialogue_id"], text, turn["label"], decision.event))
    return gold, events, rows


def f1(gold: list[bool], events: list[str]) -> float:
    from conversations.thread_features import f1 as _f1

    return _f1(gold, [e in ("NEW_TOPIC", "RETURN") for e in events])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--cache", type=Path, default=None, help="keep the texts' embeddings in this .npz")
    parser.add_argument("--resolution", nargs="+", default=["scorer", "farewell", "never"])
    parser.add_argument(
        "--replayed-rows", action="store_true", help="train each fold also on the pipeline's own states"
    )
    parser.add_argument("--dev", action="store_true", help="also replay TIAGE dev (a second check)")
    parser.add_argument(
        "--fold-seed",
        type=int,
        default=None,
        help="shuffle the dialogues' folds with this seed (default i %% 5)",
    )
    parser.add_argument(
        "--similarity",
        nargs="*",
        default=[],
        choices=("last", "topic", "diff", "prev"),
        help="a learned similarity's inputs (measured, not shipped; default none: the shipped features)",
    )
    parser.add_argument(
        "--similarity-factor", type=float, default=30.0, help="L2 on them, x the hand features'"
    )
    parser.add_argument(
        "--project", type=int, default=0, help="reduce them to K principal directions per fold"
    )
    parser.add_argument(
        "--thresholds", type=float, nargs="+", default=None, help=f"default {THRESHOLDS.tolist()}"
    )
    args = parser.parse_args()
    thresholds = np.asarray(args.thresholds) if args.thresholds else THRESHOLDS

    import django

    django.setup()
    from train_thread_model import examples, load

    from agentflow.embeddings import get_embedder
    from conversations.thread_features import N_CHITCHAT, N_HAND, Scorer, fit_logistic, load_model

    tiage = load(args.datasets / "tiage_threads" / "train.jsonl")
    dev = load(args.datasets / "tiage_threads" / "dev.jsonl") if args.dev else []
    seen: dict[str, np.ndarray] = {}
    if args.cache and args.cache.exists():
        with np.load(args.cache) as cached:
            seen.update(zip(cached["texts"].tolist(), cached["vectors"], strict=True))
    texts = sorted({t["utterance"] for d in tiage + dev for t in d["turns"]} - set(seen))
    if texts:
        embedder = get_embedder()
        for i in range(0, len(texts), 64):
            seen.update(zip(texts[i : i + 64], embedder.embed(texts[i : i + 64]), strict=True))
        if args.cache:
            np.savez(args.cache, texts=np.asarray(list(seen)), vectors=np.asarray(list(seen.values())))

    def embed(batch: list[str]) -> list[np.ndarray]:
        return [seen[t] for t in batch]

    key = register_similarity(tuple(args.similarity)) if args.similarity else "chitchat"
    shipped = replace(load_model("chitchat"), feature_set=key)
    x_raw, labels, groups = examples(tiage, embed, user_speakers=None, feature_set=key)
    y = (labels == "NEW_TOPIC").astype(float)
    # dialogue i goes to fold i % 5 (the figures in the docs) or, with --fold-seed, to a shuffled one
    fold_of = np.arange(len(tiage)) % FOLDS
    if args.fold_seed is not None:
        fold_of = np.random.default_rng(args.fold_seed).permutation(len(tiage)) % FOLDS
    folds = fold_of[groups]
    width = N_HAND + 384 + N_CHITCHAT
    projections: dict = {}

    def use(k: int | str) -> np.ndarray:
        """The gold rows for the scorers of fold ``k`` ("all": dev), with that fold's projection (fitted
        on its training rows only) put in place for the replays too."""
        PROJECTION.clear()
        if not (args.project and args.similarity):
            return x_raw
        if k not in projections:
            rows = x_raw[:, width:] if k == "all" else x_raw[folds != k, width:]
            center = rows.mean(axis=0)
            _, _, vt = np.linalg.svd(rows - center, full_matrices=False)
            projections[k] = (center.astype(np.float32), vt[: args.project].T.astype(np.float32))
        PROJECTION["center"], PROJECTION["matrix"] = projections[k]
        return np.concatenate(
            [x_raw[:, :width], (x_raw[:, width:] - projections[k][0]) @ projections[k][1]], 1
        )

    def fit(xs: np.ndarray, ys: np.ndarray, threshold: float = 0.5) -> Scorer:
        strengths = np.full(xs.shape[1], L2)
        strengths[N_HAND : N_HAND + 384] *= EMBEDDING_FACTOR
        strengths[width:] *= args.similarity_factor
        w, b, mean, scale = fit_logistic(xs, ys, l2=strengths)
        f32 = np.float32
        return Scorer(w.astype(f32), float(b), mean.astype(f32), scale.astype(f32), threshold)

    fitted = [fit(use(k)[folds != k], y[folds != k]) for k in range(FOLDS)]
    by_fold = [[d for i, d in enumerate(tiage) if fold_of[i] == k] for k in range(FOLDS)]
    dev_scorer = shipped.new_topic
    if dev and load_model("chitchat").feature_set != key and not args.replayed_rows:
        dev_scorer = fit(use("all"), y, shipped.new_topic.threshold)
    if args.replayed_rows:
        # Also train on the states the pipeline itself builds. Nested: for held-out fold k, each other
        # fold j is replayed with a scorer that saw neither j nor k; for dev, each train fold with the
        # scorer trained on the other four.
        print("training on gold-segmentation rows + the other folds' replayed rows (nested)")

        def replayed(j: int, scorer: Scorer) -> tuple[np.ndarray, np.ndarray]:
            rows: list = []
            model = replace(shipped, new_topic=replace(scorer, threshold=shipped.new_topic.threshold))
            gold, _, _ = replay(by_fold[j], seen, model, rows)
            return np.asarray(rows), np.asarray(gold, dtype=float)

        nested = []
        for k in range(FOLDS):
            x = use(k)
            parts_x, parts_y = [x[folds != k]], [y[folds != k]]
            for j in range(FOLDS):
                if j != k:
                    inner = (folds != k) & (folds != j)
                    rx, ry = replayed(j, fit(x[inner], y[inner]))
                    parts_x.append(rx)
                    parts_y.append(ry)
            nested.append(fit(np.concatenate(parts_x), np.concatenate(parts_y)))
        if dev:
            x = use("all")
            parts = [replayed(j, fit(x[folds != j], y[folds != j])) for j in range(FOLDS)]
            dev_scorer = fit(
                np.concatenate([x, *(p[0] for p in parts)]),
                np.concatenate([y, *(p[1] for p in parts)]),
                shipped.new_topic.threshold,
            )
        fitted = nested
    print(
        f"TIAGE train {len(tiage)} dialogues, {len(y)} scored turns; L2 {L2}, embedding x{EMBEDDING_FACTOR};"
        f" similarity {args.similarity or 'none'} x{args.similarity_factor} project {args.project or 'no'}"
    )
    placed: dict[str, list[tuple]] = {}  # each variant's rows at the shipped threshold
    for variant in args.resolution:
        gated = GatedModel(
            **{f: getattr(shipped, f) for f in shipped.__dataclass_fields__}, resolves=RESOLVES[variant]
        )
        table = np.zeros((len(thresholds), FOLDS))
        resolutions = np.zeros(len(thresholds), dtype=int)
        for ti, threshold in enumerate(thresholds):
            for k in range(FOLDS):
                model = replace(gated, new_topic=replace(fitted[k], threshold=float(threshold)))
                use(k)
                gold, events, rows = replay(by_fold[k], seen, model)
                table[ti, k] = f1(gold, events)
                if abs(threshold - shipped.new_topic.threshold) < 1e-9:
                    placed.setdefault(variant, []).extend(rows)
                resolutions[ti] += events.count("RESOLUTION")
            row = table[ti]
            print(
                f"  {variant:<9} threshold {threshold:.3f}: F1 {row.mean():.3f} ± {row.std():.3f}"
                f" [{row.min():.3f}, {row.max():.3f}]  RESOLUTION {resolutions[ti]}"
            )
        best = int(table.mean(axis=1).argmax())
        inner = [table[:, [j for j in range(FOLDS) if j != k]].mean(axis=1).argmax() for k in range(FOLDS)]
        nested = np.asarray([table[inner[k], k] for k in range(FOLDS)])
        print(
            f"  {variant}: best {thresholds[best]:.3f} F1 {table[best].mean():.3f} ± {table[best].std():.3f}"
            f" [{table[best].min():.3f}, {table[best].max():.3f}] folds {np.round(table[best], 3).tolist()};"
            f" threshold chosen on the other four folds {[float(thresholds[i]) for i in inner]}:"
            f" {nested.mean():.3f} ± {nested.std():.3f} [{nested.min():.3f}, {nested.max():.3f}]"
        )
        if dev:
            for threshold in sorted({float(thresholds[best]), shipped.new_topic.threshold}):
                model = replace(gated, new_topic=replace(dev_scorer, threshold=threshold))
                use("all")
                gold, events, _ = replay(dev, seen, model)
                print(
                    f"  {variant} dev ({'replayed rows' if args.replayed_rows else 'shipped scorer'}) at {threshold:.3f}: NEW_TOPIC F1 {f1(gold, events):.3f},"
                    f" RESOLUTION {events.count('RESOLUTION')} of {len(events)}"
                )
        if variant != "scorer" and "scorer" in placed and variant in placed:
            print(
                f"  {variant} against scorer at {shipped.new_topic.threshold}: "
                + changes(placed["scorer"], placed[variant])
            )


def changes(before: list[tuple], after: list[tuple]) -> str:
    """What a variant changed: the turns resolved before, and the new-topic verdicts that flipped."""
    from collections import Counter

    resolved = Counter((b[2], a[3]) for b, a in zip(before, after, strict=True) if b[3] == "RESOLUTION")
    flips: Counter = Counter()
    for i, (b, a) in enumerate(zip(before, after, strict=True)):
        if (b[3] in ("NEW_TOPIC", "RETURN")) != (a[3] in ("NEW_TOPIC", "RETURN")):
            where = "resolved turn" if b[3] == "RESOLUTION" else "other"
            if i and before[i - 1][0] == b[0] and before[i - 1][3] == "RESOLUTION":
                where = "after a resolution"
            flips[(b[2], "now new" if a[3] in ("NEW_TOPIC", "RETURN") else "now not new", where)] += 1
    return (
        f"resolved turns (gold, now placed) {dict(resolved)}; new-topic verdicts flipped {sum(flips.values())}:"
        f" {dict(flips)}"
    )


if __name__ == "__main__":
    main()
