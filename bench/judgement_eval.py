"""The LLM's thread judgements, measured: when they are asked and how their answers combine with the scorer.

    python bench/judgement_eval.py [--part heldout|tune|all] [--verdicts oracle|noisy|wrong|error|off-script]
                                   [--margin 0.08] [--limit N]
    python bench/judgement_eval.py --stage-band [--verdicts ...] [--files fresh5,styles] [--limit N]
    ANTHROPIC_API_KEY=... python bench/judgement_eval.py --real [--stage-band] [--model claude-haiku-5-5]

Replays the support-chat set (bench/data/support_turns.jsonl) through ``Agent.process_message``
*online*: the message is stored, the thread scorer decides, and when it is unsure (a probability
within ``judgement_margin`` of its threshold) the turn runner asks the LLM (``Agent.judge_thread``:
a forced ``place_message`` tool call) and places the message with the verdict; an error or an
off-script answer leaves the scorer's decision. The assistant turns of the dialogue are recorded
as the replies' context.

Without ``--real`` the LLM is the fake Messages API (agentflow.testing) driven through the real
SDK, with verdicts scripted from the gold labels: ``oracle`` (always right), ``noisy`` (right 4
times in 5, else another event), ``wrong`` (always another event), ``error`` (HTTP 500 on every
call) and ``off-script`` (text, no tool call). That tests the logic around the LLM: how often it
is asked, that a right verdict is taken, that a wrong one is taken too (the LLM outranks the
scorer when asked), and that failures fall back to the scorer. With ``--real`` and an
``ANTHROPIC_API_KEY``, the same replay measures a real model's online quality: compare its
"after the LLM" row with the offline one (``--verdicts error`` gives the scorer alone).

``--stage-band`` replays instead every support set (bench/data/support_*.jsonl) and scores each
dialogue's last user turn, as the held-out sets are scored, for the second stage for unmarked topic
shifts: its uncertain band is a thread it opened with P (``p_shift_stage``) within the margin above
its threshold, or a continuation it read with P within the margin below. Per file it prints the last
turns put to the LLM, how many of them were in the stage's band (opened / continued), the accuracy on
those before and after the verdict, and topic shifts / follow-ups / resolutions right before and after;
no sentence is printed (some sets are blind). ``wrong`` is the adversarial LLM, ``error`` the
unavailable one (the stage's decision stands).

Prints, per part: the turns put to the LLM, the scorer's accuracy on them and the final accuracy
on them, the overall share of resolutions / topic shifts / follow-ups placed right before and after
the LLM, and the LLM's latency. Rows belong to users named eval-judge-<run>-*, deleted at the end (only this run's).
"""

from __future__ import annotations

import argparse
import ast
import asyncio
import os
import random
import re
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")
os.environ["AGENT_RATE_LIMIT_MESSAGES_PER_MINUTE"] = "0"
os.environ.setdefault("AGENTFLOW_LOG_LEVEL", "ERROR")

# This run's users: the cleanup deletes only these, so parallel runs leave each other alone.
RUN_PREFIX = f"eval-judge-{uuid.uuid4().hex[:8]}-"

EVENTS = ("FOLLOW_UP", "RETURN", "RESOLUTION", "NEW_TOPIC")
COARSE = {"FOLLOW_UP": "FOLLOW_UP", "RETURN": "SHIFT", "NEW_TOPIC": "SHIFT", "RESOLUTION": "RESOLUTION"}
MESSAGE_LINE = re.compile(r"New user message: (.+)\n")
OPTION_LINE = re.compile(r"^(T\d+): (.+?) \((open|dormant|resolved)", re.MULTILINE)


class ScriptedVerdicts:
    """Answers ``place_message`` requests from the gold labels of the message being judged."""

    def __init__(self, mode: str, seed: int = 13) -> None:
        self.mode = mode
        self.gold: dict[str, tuple[str, str | None]] = {}  # message text -> (event, its thread's opening)
        self.random = random.Random(seed)
        self.asked = 0

    def __call__(self, body: dict):
        from agentflow.testing.fake_anthropic import FakeReply, ToolCall

        if (body.get("tool_choice") or {}).get("name") != "place_message":
            return None  # the reply itself: the echo will do
        self.asked += 1
        if self.mode == "error":
            return FakeReply(status=500, error_type="api_error", error_message="scripted failure")
        if self.mode == "off-script":
            return FakeReply(text="It looks like a follow-up to me.")
        prompt = body["messages"][-1]["content"]
        prompt = prompt if isinstance(prompt, str) else prompt[0]["text"]
        text = ast.literal_eval(MESSAGE_LINE.search(prompt).group(1))
        event, opening = self.gold[text]
        if self.mode == "wrong" or (self.mode == "noisy" and self.random.random() < 0.2):
            event = self.random.choice([e for e in EVENTS if COARSE[e] != COARSE[event]])
        labels = {topic: label for label, topic, _ in OPTION_LINE.findall(prompt)}
        label = next(
            (lab for topic, lab in labels.items() if opening and opening.startswith(_topic(topic))), None
        )
        if event != "NEW_TOPIC" and label is None:
            label = "T1"
        verdict = {"event": event, "confidence": 0.9} | ({"thread": label} if event != "NEW_TOPIC" else {})
        return FakeReply(tool_calls=[ToolCall("place_message", verdict)])


def _topic(listed: str) -> str:
    try:
        return str(ast.literal_eval(listed)).rstrip(".… ")
    except (ValueError, SyntaxError):
        return listed


async def replay(
    agent, dialogues: list[dict], verdicts: ScriptedVerdicts | None, *, margin: float = 0.0
) -> list[dict]:
    """Every labelled user turn but the first, as a row; ``last``: the dialogue's last user turn.
    ``stage_band``: the second stage read it and its P is within ``margin`` of the stage's threshold."""
    from asgiref.sync import sync_to_async

    from conversations.models import Message
    from conversations.thread_detection import shift_stage

    threshold = shift_stage().threshold
    rows = []
    for dialogue in dialogues:
        user = f"{RUN_PREFIX}{uuid.uuid4().hex[:12]}"
        openings: dict[int, str] = {}
        last = max(i for i, t in enumerate(dialogue["turns"]) if t["speaker"] == "USER")
        for index, turn in enumerate(dialogue["turns"]):
            if turn["speaker"] != "USER":
                await agent.record_message(user_id=user, content=turn["utterance"])
                continue
            if turn["label"] in ("FIRST", "NEW_TOPIC"):
                openings[turn["thread"]] = turn["utterance"]
            if verdicts is not None:
                verdicts.gold[turn["utterance"]] = (turn["label"], openings.get(turn["thread"]))
            started = time.perf_counter()
            result = await agent.process_message(user_id=user, message=turn["utterance"])
            elapsed = (time.perf_counter() - started) * 1000
            if turn["label"] == "FIRST":
                continue
            message = await sync_to_async(Message.objects.get)(pk=result["message_id"])
            signals = message.thread_signals
            judged = "llm_judgement" in signals
            scorer = (signals.get("scorer_decision") or {}).get("event") or result["thread_event"]
            p_stage = signals.get("p_shift_stage")
            rows.append(
                {
                    "gold": turn["label"],
                    "final": result["thread_event"],
                    "scorer": scorer,
                    "judged": judged,
                    "taken": signals.get("reason") == "LLM judgement",
                    "turn_ms": elapsed,
                    "last": index == last,
                    "stage_band": p_stage is not None and abs(p_stage - threshold) < margin,
                    "stage_opened": p_stage is not None and p_stage >= threshold,
                }
            )
    return rows


def report(name: str, rows: list[dict], asked: int | None) -> None:
    def right(key: str, subset: list[dict]) -> str:
        hits = sum(COARSE[r[key]] == COARSE[r["gold"]] for r in subset)
        return f"{hits / len(subset):6.1%} ({hits}/{len(subset)})" if subset else "     -"

    judged = [r for r in rows if r["judged"]]
    print(f"\n{name}: {len(rows)} scored turns")
    print(f"  put to the LLM             {len(judged)} ({len(judged) / max(1, len(rows)):.1%})", end="")
    print(
        f"; verdicts taken {sum(r['taken'] for r in judged)}"
        + (f"; requests {asked}" if asked is not None else "")
    )
    print(f"  on those: scorer right     {right('scorer', judged)}   after the LLM {right('final', judged)}")
    for what, gold in (("resolutions", "RESOLUTION"), ("topic shifts", "SHIFT"), ("follow-ups", "FOLLOW_UP")):
        subset = [r for r in rows if COARSE[r["gold"]] == gold]
        print(
            f"  {what:<13} right: scorer {right('scorer', subset)}   after the LLM {right('final', subset)}"
        )
    ordered = sorted(r["turn_ms"] for r in rows)
    if ordered:
        p50, p95 = ordered[len(ordered) // 2], ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
        print(f"  whole turn (with reply)    p50 {p50:.0f} ms  p95 {p95:.0f} ms")


def load_support_sets(names: list[str] | None) -> list[tuple[str, list[dict]]]:
    """Every bench/data/support_*.jsonl (or those named, e.g. ``fresh5`` for support_fresh5.jsonl)."""
    import json

    paths = sorted((ROOT / "bench" / "data").glob("support_*.jsonl"))
    if names:
        wanted = {f"support_{n.removeprefix('support_').removesuffix('.jsonl')}.jsonl" for n in names}
        if missing := wanted - {p.name for p in paths}:
            raise SystemExit(f"no such support set: {', '.join(sorted(missing))}")
        paths = [p for p in paths if p.name in wanted]
    sets = []
    for path in paths:
        dialogues = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        sets.append((path.name, [d for d in dialogues if any(t["speaker"] == "USER" for t in d["turns"])]))
    return sets


STAGE_COLUMNS = (
    f"  {'set':<28} {'last':>5} {'asked':>5} {'band':>5} {'opened':>6}  {'band right':>14}  "
    f"{'shifts right':>14}  {'follow-ups right':>16}  {'resolutions right':>17}"
)


def report_stage_band(name: str, rows: list[dict]) -> None:
    """One line for a support set: its last turns, those put to the LLM and those in the stage's band
    (of which the stage opened a thread), then right before the LLM -> after it."""

    def right(subset: list[dict], width: int) -> str:
        before = sum(COARSE[r["scorer"]] == COARSE[r["gold"]] for r in subset)
        after = sum(COARSE[r["final"]] == COARSE[r["gold"]] for r in subset)
        return f"{before:>{width}} -> {after}/{len(subset)}"

    last = [r for r in rows if r["last"]]
    band = [r for r in last if r["stage_band"]]
    shifts, follow_ups, resolutions = (
        [r for r in last if COARSE[r["gold"]] == gold] for gold in ("SHIFT", "FOLLOW_UP", "RESOLUTION")
    )
    print(
        f"  {name:<28} {len(last):>5} {sum(r['judged'] for r in last):>5} {len(band):>5}"
        f" {sum(r['stage_opened'] for r in band):>6}  {right(band, 4):>14}  {right(shifts, 4):>14}"
        f"  {right(follow_ups, 5):>16}  {right(resolutions, 5):>17}"
    )


async def stage_band_async(agent, args: argparse.Namespace, verdicts: ScriptedVerdicts | None) -> None:
    mode = "a real LLM" if verdicts is None else f"scripted verdicts: {verdicts.mode}"
    print(
        f"\nthe second stage's uncertain band (its P within {args.margin} of its threshold), the last user"
        f" turn of each support chat ({mode})"
    )
    print(STAGE_COLUMNS)
    every: list[dict] = []
    for name, dialogues in load_support_sets(args.files.split(",") if args.files else None):
        rows = await replay(
            agent, dialogues[: args.limit] if args.limit else dialogues, verdicts, margin=args.margin
        )
        report_stage_band(name.removesuffix(".jsonl"), rows)
        every += rows
    report_stage_band("all", every)
    print("  (right: before the LLM -> after it; shifts: NEW_TOPIC and RETURN)")


async def main_async(args: argparse.Namespace, verdicts: ScriptedVerdicts | None) -> None:
    from agentflow import AgentFrameworkBuilder

    config = {
        "name": "eval-judgement",
        "session_config": {"judgement_margin": args.margin},
        "fallback_config": {"escalate": False},
        # no memory writing: it places nothing, and its jobs only add work and log lines
        "memory_config": {"enabled": False},
    }
    if args.model:
        config["llm_config"] = {"model": args.model}
    from agentflow.registry import default_backend

    builder = AgentFrameworkBuilder().with_config(config).with_intent_categories([])
    agent = await builder.build(default_backend())
    if agent.offline:
        raise SystemExit("the agent is offline: no ANTHROPIC_API_KEY")
    try:
        if args.stage_band:
            await stage_band_async(agent, args, verdicts)
        else:
            await parts_async(agent, args, verdicts)
    finally:
        await agent.llm.aclose()


async def parts_async(agent, args: argparse.Namespace, verdicts: ScriptedVerdicts | None) -> None:
    from support_data import load_support

    for part in ["tune", "heldout"] if args.part == "all" else [args.part]:
        dialogues = load_support(part)[: args.limit] if args.limit else load_support(part)
        before = verdicts.asked if verdicts else 0
        rows = await replay(agent, dialogues, verdicts)
        mode = "a real LLM" if verdicts is None else f"scripted verdicts: {verdicts.mode}"
        report(
            f"support chats, {part} part ({mode}, margin {args.margin})",
            rows,
            None if verdicts is None else verdicts.asked - before,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=("tune", "heldout", "all"), default="heldout")
    parser.add_argument(
        "--verdicts", choices=("oracle", "noisy", "wrong", "error", "off-script"), default="noisy"
    )
    parser.add_argument("--margin", type=float, default=0.08, help="session_config.judgement_margin")
    parser.add_argument(
        "--limit", type=int, default=None, help="dialogues per part (per file with --stage-band)"
    )
    parser.add_argument(
        "--stage-band",
        action="store_true",
        help="every support set, last turn scored: the second stage's uncertain band",
    )
    parser.add_argument(
        "--files", default=None, help="with --stage-band: these sets only (fresh5,styles,...)"
    )
    parser.add_argument("--real", action="store_true", help="ask the real API (needs ANTHROPIC_API_KEY)")
    parser.add_argument("--model", default=None, help="llm_config.model for --real")
    args = parser.parse_args()

    server = verdicts = None
    if not args.real:
        from agentflow.testing.fake_anthropic import FakeAnthropicServer

        server = FakeAnthropicServer().start()
        verdicts = ScriptedVerdicts(args.verdicts)
        server.responder = verdicts
        os.environ["ANTHROPIC_API_KEY"] = "fake-key"
        os.environ["ANTHROPIC_BASE_URL"] = server.base_url
    elif not os.environ.get("ANTHROPIC_API_KEY"):
        raise SystemExit("--real needs ANTHROPIC_API_KEY")
    import django

    django.setup()
    from conversations.models import EndUser

    try:
        asyncio.run(main_async(args, verdicts))
    finally:
        EndUser.objects.filter(external_id__startswith=RUN_PREFIX).delete()
        if server is not None:
            server.stop()


if __name__ == "__main__":
    main()
