"""The gate in front of the shift stage's reply embedding: how often it skips the embedding, and that it
changes nothing.

    python bench/shift_stage_gate.py [--datasets ../shared/datasets] [--cache /tmp/gate.npz] [--users 500]

Every support set under bench/data, SGD dev and the traffic of ``bench/production_load.py`` (its users'
messages in its order, each answered by the fake LLM's echo) are replayed through the real
``decide_thread`` with the shift stage on, on the threads the replay builds (bench/train_shift_stage.py's
bookkeeping), twice: the reply always embedded (no gate) and with the shipped gate. Per set it prints the
stage's readings, how many the gate settled without embedding the reply, the decisions and stage P
signals that differ between the two runs (must be 0), readings whose bound ``p_shift_stage_max`` is
below the P the embedding gives (must be 0), and the lowest sim_reply: at the stage's readings, and over
every pair of a user message and the reply before it (TIAGE dev, chit-chat with no stage, gives pairs of
consecutive turns), and over every text of these sets against every reply tail (the encoder's lower tail
on real text). ``SIM_REPLY_FLOOR`` must stay clearly below the lowest of these.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")

DATA = ROOT / "bench" / "data"
FLOORS = (-1.0, -0.5, -0.4, -0.3, -0.25, -0.2)


def production_traffic(users: int, messages: int) -> list[dict]:
    """bench/production_load.py's users (``<tag>-<i>``), each sending ``messages`` messages in its order
    with its markers, each answered by the fake Messages API's default reply ("Echo: <message>")."""
    from stack import MESSAGES

    tag = "prodload-0a1b2c"
    dialogues = []
    for i in range(users):
        user = f"{tag}-{i}"
        turns = []
        for n in range(messages):
            text = f"{MESSAGES[(n + len(user)) % len(MESSAGES)]} [{user}-m{n}]"
            turns.append({"speaker": "USER", "utterance": text, "label": "FIRST" if n == 0 else "?"})
            turns.append({"speaker": "SYSTEM", "utterance": f"Echo: {text}", "label": None})
        dialogues.append({"dialogue_id": user, "turns": turns})
    return dialogues


def load_sets(datasets: Path, users: int) -> dict[str, list[dict]]:
    from support_data import load_support, load_support_holdout

    def jsonl(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    sets = {"support_turns": load_support()}
    for name in ("unmarked2", "fresh3", "fresh4", "holdout", "holdout2", "check_unmarked"):
        sets[f"support_{name}"] = load_support_holdout(DATA / f"support_{name}.jsonl", any_split=True)
    sets["SGD dev"] = jsonl(datasets / "sgd_threads" / "dev.jsonl")
    sets["TIAGE dev (pairs only)"] = jsonl(datasets / "tiage_threads" / "dev.jsonl")
    sets["production_load traffic"] = production_traffic(users, 3)
    return sets


def replay(dialogues: list[dict], vectors: dict, stage) -> tuple[list[tuple], list[dict]]:
    """Every user turn's decision and every stage reading (its sim_reply, whether the reply was embedded,
    its P or bound), with ``stage`` as the shipped stage."""
    from train_shift_stage import NOW, Thread, candidates

    from conversations import thread_detection
    from conversations.thread_detection import _cos, decide_thread, reply_tail, shift_stage_features
    from conversations.thread_features import load_model

    model = load_model("task")
    decisions: list[tuple] = []
    readings: list[dict] = []
    real = thread_detection.stage_opens_subject

    def watched(text, embedding, state, p_new, embed_reply, **options):
        asked: list[str] = []
        reading = real(text, embedding, state, p_new, lambda t: asked.append(t) or embed_reply(t), **options)
        if reading.p is not None or reading.p_max is not None:
            tail = reply_tail(state.last_assistant_text, stage.reply_words)
            x = shift_stage_features(text, embedding, state, p_new, vectors[tail])
            readings.append(
                {
                    "sim_reply": _cos(embedding, vectors[tail]),
                    "logit": stage.logit(x),
                    "embedded": bool(asked),
                    "p": reading.p,
                    "p_max": reading.p_max,
                }
            )
        return reading

    thread_detection._shift_stage = stage
    thread_detection.stage_opens_subject = watched
    try:
        for dialogue in dialogues:
            threads: list = []
            for clock, turn in enumerate(dialogue["turns"]):
                text = turn["utterance"]
                if turn["speaker"] != "USER":
                    if threads:
                        max(threads, key=lambda t: t.clock).reply(text, clock)
                    continue
                v = vectors[text]
                decision = decide_thread(
                    text=text,
                    embedding=v,
                    candidates=candidates(threads),
                    now=NOW,
                    inactivity=timedelta(minutes=30),
                    model=model,
                    embed_reply=vectors.__getitem__,
                )
                decisions.append(
                    (decision.event, decision.thread_id, decision.confidence, decision.signals["reason"])
                )
                by_key = {t.key: t for t in threads}
                if decision.thread_id is None:
                    threads.append(Thread(len(threads), text, v, clock))
                elif decision.event == "RESOLUTION":
                    by_key[decision.thread_id].resolve(v, clock)
                else:
                    by_key[decision.thread_id].add(text, v, clock)
    finally:
        thread_detection.stage_opens_subject = real
    return decisions, readings


def pairs(dialogues: list[dict], *, every_turn: bool) -> list[tuple[str, str]]:
    """(message, the reply before it) for every user message after a reply (``every_turn``: any turn
    after the previous one, for chit-chat where both speakers are users)."""
    found = []
    for dialogue in dialogues:
        turns = dialogue["turns"]
        for before, turn in itertools.pairwise(turns):
            if every_turn or (turn["speaker"] == "USER" and before["speaker"] != "USER"):
                found.append((turn["utterance"], before["utterance"]))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--cache", type=Path, default=None, help="keep the texts' embeddings in this .npz")
    parser.add_argument("--users", type=int, default=500, help="production_load users replayed (500)")
    args = parser.parse_args()
    import django

    django.setup()
    from train_shift_stage import embedded

    from conversations.thread_detection import SIM_REPLY_FLOOR, _cos, reply_tail, shift_stage

    shipped = shift_stage()
    ungated = dataclasses.replace(shipped, reply_floor=None)
    sets = load_sets(args.datasets, args.users)
    utterances = {t["utterance"] for ds in sets.values() for d in ds for t in d["turns"]}
    vectors = embedded(utterances, shipped.reply_words, args.cache)

    print(
        f"stage {shipped.version}: d logit / d sim_reply = {shipped.reply_slope:+.3f} from the loaded weights;"
        f" gate floor {shipped.gate_floor} (SIM_REPLY_FLOOR {SIM_REPLY_FLOOR})"
    )
    print(
        f"{'set':<26} {'turns':>6} {'read':>5} {'not embedded':>14} {'decisions':>9} {'P':>3} {'bound':>5}"
        f" {'min sim_reply read':>18} {'min over pairs':>14}"
    )
    lowest: list[float] = []
    sweep: dict[str, list[dict]] = {}
    total_read = total_skipped = 0
    for name, dialogues in sets.items():
        chitchat = name.startswith("TIAGE")
        every = [
            _cos(vectors[m], vectors[reply_tail(r[:2000], shipped.reply_words)])
            for m, r in pairs(dialogues, every_turn=chitchat)
        ]
        lowest += every
        if chitchat:
            print(
                f"{name:<26} {len(every):>6} {'-':>5} {'-':>14} {'-':>9} {'-':>3} {'-':>5} {'-':>18} {min(every):>14.3f}"
            )
            continue
        base_decisions, base_readings = replay(dialogues, vectors, ungated)
        sweep[name] = base_readings
        decisions, readings = replay(dialogues, vectors, shipped)
        changed = sum(a != b for a, b in zip(base_decisions, decisions, strict=True))
        read = [r for r in readings if r["embedded"]]
        p_changed = sum(
            a["p"] != b["p"] for a, b in zip(base_readings, readings, strict=True) if b["embedded"]
        )
        bound_below = sum(
            b["p_max"] < a["p"] for a, b in zip(base_readings, readings, strict=True) if not b["embedded"]
        )
        skipped = len(readings) - len(read)
        total_read += len(readings)
        total_skipped += skipped
        low = min((r["sim_reply"] for r in base_readings), default=float("nan"))
        print(
            f"{name:<26} {len(decisions):>6} {len(readings):>5} {skipped:>5} ({skipped / max(1, len(readings)):5.1%})"
            f" {changed:>9} {p_changed:>3} {bound_below:>5} {low:>18.3f} {min(every):>14.3f}"
        )
    cut = float(np.log(shipped.threshold / (1 - shipped.threshold)))
    print(
        f"readings the gate would settle without the reply's embedding, by floor ({', '.join(map(str, FLOORS))}):"
    )
    for name, base_readings in sweep.items():
        shares = [
            sum(r["logit"] + shipped.reply_slope * (floor - r["sim_reply"]) < cut for r in base_readings)
            / max(1, len(base_readings))
            for floor in FLOORS
        ]
        print(f"  {name:<26} {' '.join(f'{share:6.1%}' for share in shares)}")
    messages = sorted({t["utterance"] for ds in sets.values() for d in ds for t in d["turns"]})
    m = np.asarray([vectors[t] for t in messages])
    r = np.asarray(
        [vectors[t] for t in sorted({reply_tail(u[:2000], shipped.reply_words) for u in messages})]
    )
    m, r = m / np.linalg.norm(m, axis=1, keepdims=True), r / np.linalg.norm(r, axis=1, keepdims=True)
    blocks = [m[i : i + 1000] @ r.T for i in range(0, len(m), 1000)]
    print(
        f"every text against every reply tail ({len(m) * len(r):,} pairs): lowest cosine"
        f" {min(float(b.min()) for b in blocks):.3f}; below -0.2: {sum(int((b < -0.2).sum()) for b in blocks)},"
        f" below -0.3: {sum(int((b < -0.3).sum()) for b in blocks)}"
    )
    ordered = sorted(lowest)
    print(
        f"all sets: {total_skipped} of {total_read} readings settled without the reply's embedding"
        f" ({total_skipped / max(1, total_read):.1%}); sim_reply over {len(ordered)} message/reply pairs:"
        f" lowest {ordered[0]:.3f}, 0.1 % {ordered[len(ordered) // 1000]:.3f}, 1 % {ordered[len(ordered) // 100]:.3f}"
    )


if __name__ == "__main__":
    main()
