"""Where an in-process turn's CPU goes, step by step (issue 13: <= 12 ms of CPU a turn).

    python bench/turn_steps.py [--users 4] [--turns 50] [--concurrent] [--embedder-cache] [--gc-freeze]

``agent.process_message`` with ``bench/peer_ratio.py``'s agent and messages against the peer's fake
Messages API (L = 0), in this process, after three warm-up turns; the memory jobs the turns queue
are waited for and counted. By default the users talk one after another (load A's shape: one
conversation at a time, ``--users`` of them for more samples); ``--concurrent`` runs them at once
(``--users 100 --turns 5`` is load B). The embedder's text cache is off unless ``--embedder-cache``
(the bench repeats its texts; real traffic does not).

Prints, per turn: the process's CPU (user and system) and the event loop thread's (the turn's
coroutine, the LLM call through the SDK); for each step in ``STEPS``, its calls and thread CPU
(inclusive: a step's figure includes the steps it calls, e.g. ``prepare`` includes the embedding), and
the thread decision's CPU less the encoder's forward passes inside it (the shift stage's reply end);
and the SQL statements sent, by thread (the turns' database threads, the memory jobs'), with the
pool's health checks (an empty query at each checkout) apart; and Python's garbage collections.
Thread CPU is ``time.thread_time`` around each call: that thread's CPU only (its waits for
PostgreSQL, Redis or the GIL are not counted; onnxruntime runs on the calling thread). Figures
for docs/operations.md ("In-process CPU per turn"); the wrappers add a few microseconds a call.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import functools
import gc
import os
import sys
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import peer_ratio  # bench/peer_ratio.py: sets the bench's environment on import
from step_wrap import wrap_steps

#: (module, attribute) of each step timed: the turn's database steps and what they spend on.
STEPS: tuple[tuple[str, str], ...] = (
    ("agentflow.pipeline", "accept_and_prepare"),
    ("agentflow.pipeline", "accept"),
    ("agentflow.pipeline", "prepare"),
    ("agentflow.pipeline", "_message_of"),
    ("agentflow.pipeline", "decide_and_place"),
    ("conversations.selectors", "thread_candidates"),
    ("agentflow.pipeline", "decide_thread"),
    ("conversations.thread_detection", "stage_opens_subject"),
    ("intents.classifier", "IntentClassifier.classify"),
    ("conversations.turns", "message_place"),
    ("agentflow.pipeline", "_prepared"),
    ("agentflow.pipeline", "memory_search"),
    ("conversations.selectors", "thread_history"),
    ("agentflow.pipeline", "finish"),
    ("conversations.services", "turn_mark_done_with_reply"),
    ("conversations.turn_results", "turn_settled"),
    ("conversations.events", "publish_from_thread"),
    ("agentflow.embeddings", "MiniLMEmbedder._run"),
    ("django.db.backends.base.base", "BaseDatabaseWrapper.connect"),
    ("agentflow.loops", "release_connections"),
    ("agentflow.jobs", "_run_inline"),
    ("memory.tasks", "remember_resolution.run"),
    ("memory.tasks", "remember_preference.run"),
    ("memory.tasks", "memory_remember"),
    ("memory.tasks", "agent_for"),
    ("agentflow.loops", "run_off_database"),
)

_steps: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])  # name -> [calls, seconds]
_statements: collections.Counter[str] = collections.Counter()
_gc: dict[str, Any] = {"started": {}, "by_generation": collections.Counter(), "seconds": 0.0}


def _gc_callback(phase: str, info: dict[str, Any]) -> None:
    """Python's garbage collections: how many of each generation, and their thread CPU."""
    thread = threading.get_ident()
    if phase == "start":
        _gc["started"][thread] = time.thread_time()
    elif (started := _gc["started"].pop(thread, None)) is not None:
        _gc["by_generation"][info["generation"]] += 1
        _gc["seconds"] += time.thread_time() - started


ENCODER = "embeddings.MiniLMEmbedder._run"
_encoder_inside: collections.Counter[str] = collections.Counter()  # step -> seconds of the encoder in it
_open = threading.local()  # the steps running on this thread


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        running = _open.__dict__.setdefault("steps", [])
        running.append(name)
        try:
            return fn(*args, **kwargs)
        finally:
            running.pop()
            seconds = time.thread_time() - started
            entry = _steps[name]
            entry[0] += 1
            entry[1] += seconds
            if name == ENCODER:
                for outer in set(running):
                    _encoder_inside[outer] += seconds

    return call


def install() -> None:
    """Wrap each step where its callers look it up (a module attribute, or a class's method)."""
    wrap_steps(STEPS, _timed)
    import psycopg

    execute = psycopg.Cursor.execute

    def counted(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
        text = query.decode() if isinstance(query, bytes) else str(query)
        words = text.split()
        if words[:1] in (["SAVEPOINT"], ["RELEASE"]):
            words = words[:-1]  # the savepoint's name differs by thread
        kind = " ".join(words[:3])[:40] or "(pool health check)"
        _statements[f"{threading.current_thread().name.split('_')[0]}: {kind}"] += 1
        return execute(self, query, *args, **kwargs)

    psycopg.Cursor.execute = counted  # type: ignore[method-assign]
    gc.callbacks.append(_gc_callback)


def _thread_cpu(native_id: int) -> float:
    fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / peer_ratio.CLK_TCK


async def drive(args: argparse.Namespace, llm_url: str) -> tuple[str, int]:
    from anthropic import AsyncAnthropic

    from agentflow import AgentFrameworkBuilder
    from agentflow.jobs import wait_for_inline_jobs
    from agentflow.management.commands.agentflow_demo import DEMO_CATEGORIES
    from agentflow.types import IntentCategory as Spec

    templates, colors = peer_ratio.peer_messages(args.peer_script)
    client = AsyncAnthropic(api_key="bench-key", base_url=llm_url, max_retries=0, timeout=120.0)
    agent = await (
        AgentFrameworkBuilder()
        .with_config(peer_ratio.BENCH_CONFIG)
        .with_intent_categories(
            [Spec(c.name, c.description, list(c.examples), threshold=0.01) for c in DEMO_CATEGORIES]
        )
        .build(client)
    )
    run = f"steps-{uuid.uuid4().hex[:8]}"
    for i in range(3):  # warm-up: model, classifier, pool, HTTP keep-alive, compiled queries
        await agent.process_message(
            user_id=f"bench-{run}-warm", message=peer_ratio.user_message(templates, colors, 0, i)
        )
    await asyncio.to_thread(wait_for_inline_jobs, 60)
    if args.gc_freeze:  # what a host script may do once its agent is built (docs/operations.md)
        gc.collect()
        gc.freeze()
    _steps.clear()
    _encoder_inside.clear()
    _statements.clear()
    _gc["by_generation"].clear()
    _gc["seconds"] = 0.0

    async def user(u: int) -> None:
        for m in range(args.turns):
            result = await agent.process_message(
                user_id=f"bench-{run}-{u}", message=peer_ratio.user_message(templates, colors, u, m)
            )
            if result.get("status") != "done":
                raise RuntimeError(f"turn not done: {result.get('status')}")

    loop_thread = threading.get_native_id()
    times, loop_cpu, began = os.times(), _thread_cpu(loop_thread), time.perf_counter()
    if args.concurrent:
        await asyncio.gather(*(user(u) for u in range(args.users)))
    else:
        for u in range(args.users):
            await user(u)
    await asyncio.to_thread(wait_for_inline_jobs, 300)
    wall = time.perf_counter() - began
    after = os.times()
    n = args.users * args.turns
    lines = [
        f"{n} turns ({args.users} users x {args.turns}, {'at once' if args.concurrent else 'one after another'}),"
        f" embedder cache {'on' if args.embedder_cache else 'off'}{', gc.freeze()' if args.gc_freeze else ''}; wall {1000 * wall / n:.1f} ms a turn",
        f"CPU ms per turn: process {1000 * (after.user + after.system - times.user - times.system) / n:.2f}"
        f" (user {1000 * (after.user - times.user) / n:.2f}, system {1000 * (after.system - times.system) / n:.2f});"
        f" event loop thread {1000 * (_thread_cpu(loop_thread) - loop_cpu) / n:.2f}",
        "steps (thread CPU, inclusive):",
    ]
    for name, (calls, seconds) in sorted(_steps.items(), key=lambda item: -item[1][1]):
        lines.append(f"  {name:<46} {calls / n:5.2f} calls  {1000 * seconds / n:6.2f} ms a turn")
    lines.append("the same steps less the encoder's forward passes inside them:")
    for name in ("pipeline.decide_thread", "thread_detection.stage_opens_subject"):
        calls, seconds = _steps.get(name, (0, 0.0))
        lines.append(
            f"  {name:<46} {calls / n:5.2f} calls  {1000 * (seconds - _encoder_inside[name]) / n:6.2f} ms a turn"
        )
    generations = ", ".join(
        f"{count / n:.2f} of generation {g}" for g, count in sorted(_gc["by_generation"].items())
    )
    lines.append(
        f"garbage collections per turn: {generations or 'none'}; {1000 * _gc['seconds'] / n:.2f} ms a turn"
    )
    lines.append(f"SQL statements per turn: {sum(_statements.values()) / n:.2f}")
    for kind, count in _statements.most_common():
        lines.append(f"  {count / n:5.2f}  {kind}")
    return "\n".join(lines), n


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=4)
    parser.add_argument("--turns", type=int, default=50, help="turns of each user")
    parser.add_argument("--concurrent", action="store_true", help="the users at once (load B's shape)")
    parser.add_argument("--embedder-cache", action="store_true", help="keep the text -> vector cache on")
    parser.add_argument(
        "--gc-freeze",
        action="store_true",
        help="gc.freeze() after the warm-up (startup objects never scanned again)",
    )
    parser.add_argument("--peer-script", type=Path, default=peer_ratio.PEER_DIR / "langgraph_peer.py")
    parser.add_argument("--fake-llm", type=Path, default=peer_ratio.PEER_DIR / "fake_anthropic.py")
    args = parser.parse_args()
    if not args.embedder_cache:
        os.environ["AGENTFLOW_EMBEDDER_CACHE_SIZE"] = "0"
    llm, url = peer_ratio.start_fake_llm(args.fake_llm, 0.0)
    os.environ["ANTHROPIC_BASE_URL"], os.environ["ANTHROPIC_API_KEY"] = url, "bench-key"
    try:
        import django

        django.setup()
        from django.core.management import call_command

        from conversations.models import EndUser

        call_command("migrate", verbosity=0)
        install()
        try:
            report, _ = asyncio.run(drive(args, url))
            print(report)
        finally:
            EndUser.objects.filter(external_id__startswith="bench-steps-").delete()
    finally:
        llm.terminate()
        llm.wait(10)


if __name__ == "__main__":
    main()
