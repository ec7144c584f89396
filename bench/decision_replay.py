"""CPU of the thread decision alone (everything in placing a message but the encoder), on recorded calls.

    python bench/decision_replay.py record --out /tmp/calls.pkl [--datasets ../shared/datasets] [--limit N]
    python bench/decision_replay.py time --calls /tmp/calls.pkl [--rounds 3] [--profile 30] [--against DIR]
    python bench/decision_replay.py outputs --calls /tmp/calls.pkl (--save REF.pkl | --check REF.pkl)
    python bench/decision_replay.py fixture --calls /tmp/calls.pkl --limit 1897 --out PATH  # PATH.json, PATH.npz

``record`` replays the tuning support chats (bench/data/support_turns.jsonl), the style and fresh4
files (bench/data/support_styles.jsonl, support_fresh4.jsonl) and SGD dev through the task agent, as
bench/threading_eval.py does (offline, no LLM), and keeps every ``decide_thread`` call the pipeline
makes: its text, embedding, candidate threads, clock, model, and the vectors of the reply ends the
second stage embedded. ``time`` calls ``decide_thread`` again on each recorded call, the encoder
replaced by a lookup of the recorded vectors, and prints the thread CPU (``time.thread_time``) per
decision: mean and p50 / p95 for each round, the median round, and with ``--profile N`` the N
functions of most own time (cProfile, one more round). With ``--against DIR`` (another checkout, e.g.
``git worktree add`` of the commit before a change) its decision code is timed too in the same process,
the two alternated round by round, so that both see the same load. Each round starts with the decision code's caches of texts and words empty. ``outputs`` keeps (``--save``) or compares
(``--check``) every decision's event, thread, confidence and signals, and its probabilities at full
precision (the scorer's P(new topic) and P(resolution), the second stage's P): a change meant to save
CPU must leave every one of them the same. ``fixture`` writes whole conversations of the recorded calls
(until every reason a decision gives shows ``--per-reason`` times), their vectors as float16 and this
checkout's outputs on them, for tests/conversations/test_thread_decision_identity.py: run it with the
code before a change to record what the change must reproduce.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import itertools
import json
import os
import pickle
import statistics
import sys
import time
from datetime import datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import threading_eval  # noqa: E402  (sets the bench's environment)


async def _record(args: argparse.Namespace) -> list[dict[str, Any]]:
    from support_data import load_support, load_support_holdout

    from agentflow import AgentFrameworkBuilder, pipeline

    calls: list[dict[str, Any]] = []
    original = pipeline.decide_thread

    def recording(**kwargs: Any) -> Any:
        embed = kwargs["embed_reply"]
        replies: dict[str, Any] = {}

        def embed_reply(text: str) -> Any:
            replies[text] = embed(text)
            return replies[text]

        decision = original(**{**kwargs, "embed_reply": embed_reply if embed else None})
        calls.append(
            {
                **{k: v for k, v in kwargs.items() if k not in ("model", "embed_reply")},
                "profile": kwargs["model"].profile,
                "replies": replies if embed else None,
                "decision": decision,
            }
        )
        return decision

    pipeline.decide_thread = recording
    agent = (
        await AgentFrameworkBuilder()
        .with_config({"name": "eval-task"})
        .with_intent_categories([])
        .build(None)
    )
    sets = {
        "support_turns": load_support(None),
        "support_styles": load_support_holdout(ROOT / "bench/data/support_styles.jsonl", any_split=True),
        "support_fresh4": load_support_holdout(ROOT / "bench/data/support_fresh4.jsonl", any_split=True),
        "sgd_dev": threading_eval.load(args.datasets / "sgd_threads" / "dev.jsonl", args.limit),
    }
    for name, dialogues in sets.items():
        before = len(calls)
        for d in dialogues:
            for t in d["turns"]:
                t.setdefault("label", "FIRST")
        await threading_eval.replay(agent, dialogues[: args.limit], user_speakers={"USER"})
        print(f"{name}: {len(calls) - before} decisions")
    return calls


def _decision_code(checkout: Path | None = None) -> tuple[ModuleType, ModuleType]:
    """``conversations.thread_detection`` and ``thread_features``: this checkout's, or another's (its
    ``conversations`` folder loaded under another package name, beside this one's)."""
    if checkout is None:
        from conversations import thread_detection, thread_features

        return thread_detection, thread_features
    package = ModuleType("against")
    package.__path__ = [str(checkout / "conversations")]
    sys.modules["against"] = package
    return importlib.import_module("against.thread_detection"), importlib.import_module(
        "against.thread_features"
    )


def _decide(call: dict[str, Any], code: tuple[ModuleType, ModuleType] | None = None) -> Any:
    thread_detection, thread_features = code or _decision_code()
    replies = call["replies"]
    return thread_detection.decide_thread(
        text=call["text"],
        embedding=call["embedding"],
        candidates=call["candidates"],
        now=call["now"],
        inactivity=call["inactivity"],
        model=thread_features.load_model(call["profile"]),
        embed_reply=replies.__getitem__ if replies is not None else None,
        stage_margin=call["stage_margin"],
    )


def _clear_caches(code: tuple[ModuleType, ModuleType]) -> None:
    """Forget the texts and words the decision code kept: each round sees every message as new, as the
    worker does (only the weights stay loaded)."""
    for module in code:
        for value in vars(module).values():
            if hasattr(value, "cache_clear") and value is not code[1].load_model:
                value.cache_clear()


def _round(calls: list[dict[str, Any]], code: tuple[ModuleType, ModuleType]) -> list[float]:
    _clear_caches(code)
    times = []
    for call in calls:
        started = time.thread_time()
        _decide(call, code)
        times.append(time.thread_time() - started)
    return times


def _time(calls: list[dict[str, Any]], rounds: int, profile: int, against: Path | None) -> None:
    codes = {"this checkout": _decision_code()}
    if against is not None:
        codes = {f"{against}": _decision_code(against), **codes}
    for code in codes.values():
        _round(calls[:50], code)  # warm up: weights loaded, regexes compiled
    means: dict[str, list[float]] = {name: [] for name in codes}
    for r in range(rounds):
        for name, code in codes.items():
            ms = sorted(1000 * t for t in _round(calls, code))
            means[name].append(statistics.fmean(ms))
            print(
                f"round {r + 1}, {name}: {len(ms)} decisions, mean {means[name][-1]:.3f} ms,"
                f" p50 {ms[len(ms) // 2]:.3f} ms, p95 {ms[int(0.95 * len(ms))]:.3f} ms CPU per decision"
            )
    for name, values in means.items():
        print(f"{name}: median round's mean {statistics.median(values):.3f} ms CPU per decision")
    if profile:
        import cProfile
        import pstats

        profiler = cProfile.Profile(time.thread_time)
        profiler.runcall(_round, calls, codes["this checkout"])
        pstats.Stats(profiler).sort_stats("tottime").print_stats(profile)
    print(f"load average {os.getloadavg()[0]:.2f}")


def _outputs(calls: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    """Each call's decision and its probabilities at full precision."""
    from conversations.thread_detection import shift_stage, shift_stage_features
    from conversations.thread_features import load_model

    _clear_caches(_decision_code())
    rows = []
    for call in calls:
        decision = _decide(call)
        probabilities: tuple[float, ...] = ()
        if call["candidates"]:
            model = load_model(call["profile"])
            state = call["candidates"][0].state
            p_new, p_res = model.score(model.features(call["text"], call["embedding"], state))
            probabilities = (float(p_new), float(p_res))
            replies = call["replies"] or {}
            for tail, vector in replies.items():
                x = shift_stage_features(call["text"], call["embedding"], state, p_new, vector)
                probabilities += (tail, shift_stage().probability(x))
        rows.append(
            (decision.event, decision.thread_id, decision.confidence, decision.signals, probabilities)
        )
    return rows


def _fixture(calls: list[dict[str, Any]], out: Path, per_reason: int) -> None:
    """Whole conversations until each reason a decision gives (and each veto of a resolution, and the
    second stage's P and bound) shows ``per_reason`` times, with their inputs (vectors as float16, kept once each) and the outputs of this checkout's
    code on them, for tests/conversations/test_thread_decision_identity.py."""
    starts = [i for i, call in enumerate(calls) if not call["candidates"]] + [len(calls)]
    seen: dict[str, int] = {}
    chosen: list[dict[str, Any]] = []
    for begin, end in itertools.pairwise(starts):
        dialogue = calls[begin:end]
        reasons = [str(c["decision"].signals.get("reason", "")).split(";")[0] for c in dialogue]
        kinds = [*reasons]
        for c in dialogue:
            signals = c["decision"].signals
            kinds += [f"veto: {signals['resolution_vetoed']}"] if "resolution_vetoed" in signals else []
            kinds += [k for k in ("p_shift_stage", "p_shift_stage_max") if k in signals]
        if any(seen.get(k, 0) < per_reason for k in kinds):
            for k in kinds:
                seen[k] = seen.get(k, 0) + 1
            chosen.extend(dialogue)
    vectors: dict[bytes, int] = {}

    def index(vector: Any) -> int:
        small = np.asarray(vector, dtype=np.float16)
        return vectors.setdefault(small.tobytes(), len(vectors))

    rows = []
    for call in chosen:
        rows.append(
            {
                "text": call["text"],
                "embedding": index(call["embedding"]),
                "candidates": [
                    {
                        "thread_id": str(c.thread_id),
                        "opening": index(c.state.opening),
                        "last_user": index(c.state.last_user),
                        "centroid": index(c.state.centroid),
                        "vocabulary": sorted(c.state.vocabulary),
                        "last_assistant_text": c.state.last_assistant_text,
                        "user_turns": c.state.user_turns,
                        "last_activity_at": c.last_activity_at.isoformat(),
                        "resolved": c.resolved,
                        "current_session": c.current_session,
                    }
                    for c in call["candidates"]
                ],
                "now": call["now"].isoformat(),
                "inactivity_seconds": call["inactivity"].total_seconds(),
                "replies": None
                if call["replies"] is None
                else {t: index(v) for t, v in call["replies"].items()},
                "stage_margin": call["stage_margin"],
            }
        )
    matrix = np.frombuffer(b"".join(vectors), dtype=np.float16).reshape(len(vectors), -1)
    np.savez_compressed(out.with_suffix(".npz"), vectors=matrix)
    # the outputs of this checkout's code on exactly these inputs (the vectors as stored)
    replayed = [_from_row(row, matrix.astype(np.float32)) for row in rows]
    for row, (event, thread_id, confidence, signals, probabilities) in zip(
        rows, _outputs(replayed), strict=True
    ):
        row["expected"] = {
            "event": event,
            "thread_id": thread_id,
            "confidence": float(confidence),
            "signals": signals,
            "probabilities": [p if isinstance(p, str) else float(p) for p in probabilities],
        }
    out.with_suffix(".json").write_text(json.dumps(rows, default=float) + "\n")
    print(f"{len(rows)} decisions, {len(vectors)} vectors in {out}.json / .npz; reasons: {seen}")


def _from_row(row: dict[str, Any], vectors: np.ndarray) -> dict[str, Any]:
    """A recorded call from a fixture row (thread ids as strings)."""
    from conversations.thread_detection import Candidate
    from conversations.thread_features import ThreadState

    return {
        "text": row["text"],
        "embedding": vectors[row["embedding"]],
        "candidates": [
            Candidate(
                c["thread_id"],
                ThreadState(
                    vectors[c["opening"]],
                    vectors[c["last_user"]],
                    vectors[c["centroid"]],
                    set(c["vocabulary"]),
                    c["last_assistant_text"],
                    c["user_turns"],
                ),
                datetime.fromisoformat(c["last_activity_at"]),
                resolved=c["resolved"],
                current_session=c["current_session"],
            )
            for c in row["candidates"]
        ],
        "now": datetime.fromisoformat(row["now"]),
        "inactivity": timedelta(seconds=row["inactivity_seconds"]),
        "profile": "task",
        "replies": None if row["replies"] is None else {t: vectors[i] for t, i in row["replies"].items()},
        "stage_margin": row["stage_margin"],
    }


def _check(rows: list[tuple[Any, ...]], reference: list[tuple[Any, ...]]) -> None:
    if len(rows) != len(reference):
        raise SystemExit(f"{len(rows)} decisions, the reference has {len(reference)}")
    differ = 0
    for i, (row, ref) in enumerate(zip(rows, reference, strict=True)):
        same = row[:4] == ref[:4] and len(row[4]) == len(ref[4])
        for a, b in zip(row[4], ref[4], strict=False):
            same = same and (a == b if isinstance(a, str) else abs(a - b) <= 1e-12)
        if not same:
            differ += 1
            if differ <= 5:
                print(f"decision {i} differs:\n  now {row}\n  ref {ref}")
    print(f"{len(rows)} decisions compared with the reference: {differ} differ")
    if differ:
        raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=("record", "time", "outputs", "fixture"))
    parser.add_argument("--calls", type=Path, help="the recorded calls (record: --out)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--limit", type=int, default=None, help="dialogues per set (record)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--profile", type=int, default=0, help="print this many functions of a cProfile round"
    )
    parser.add_argument(
        "--against", type=Path, help="time also the decision code of this checkout, rounds alternated"
    )
    parser.add_argument("--per-reason", type=int, default=2, help="fixture: conversations per reason")
    parser.add_argument("--save", type=Path)
    parser.add_argument("--check", type=Path)
    args = parser.parse_args()
    import django

    django.setup()
    if args.mode == "record":
        from conversations.models import EndUser

        try:
            calls = asyncio.run(_record(args))
        finally:
            EndUser.objects.filter(external_id__startswith=threading_eval.RUN_PREFIX).delete()
        args.out.write_bytes(pickle.dumps(calls))
        print(f"{len(calls)} decisions kept in {args.out}")
        return
    calls = pickle.loads(args.calls.read_bytes())
    if args.mode == "fixture":
        _fixture([c for c in calls if c["profile"] == "task"][: args.limit], args.out, args.per_reason)
    elif args.mode == "time":
        _time(calls, args.rounds, args.profile, args.against)
    elif args.save:
        args.save.write_bytes(pickle.dumps(_outputs(calls)))
        print(f"{len(calls)} decisions' outputs kept in {args.save}")
    elif args.check:
        _check(_outputs(calls), pickle.loads(args.check.read_bytes()))


if __name__ == "__main__":
    main()
