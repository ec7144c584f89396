"""CPU per LLM call of ``AnthropicBackend.generate``: this checkout's against another's (the base).

Both backends talk through the real ``anthropic`` SDK (``AsyncAnthropic`` moved to its aiohttp
transport, as ``backend_for`` does) to the fake Messages API, which runs in a thread of this process;
the CPU counted is the calling thread's (``time.thread_time``: the event loop, the SDK, aiohttp, the
backend), not the fake server's. Rounds alternate the two (which one goes first alternates too), so
both see the same machine; the medians over rounds and their spread are printed per kind of call:

    stream12   a streamed reply of 12 text deltas (on_text set: a chat socket listens)
    stream1    a streamed reply of 1 text delta
    whole      the same 12-word reply asked whole (no on_text: a REST caller)
    tool       a streamed reply with a sentence and a tool call (input_json deltas)

    python bench/llm_call_cpu.py [--base /work/wt-base/agentflow/llm.py] [--calls 300] [--rounds 5]
        [--threads 1]

With ``--threads T`` the calls run on T threads at once, each with its own event loop and client
(as the Celery worker's threads), and the CPU is the sum of those threads' ``thread_time``.

The request is a turn's usual size: a ~1,000-character system prompt and 7 history messages.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from agentflow.config import LLMConfig  # noqa: E402
from agentflow.testing.fake_anthropic import FakeAnthropicServer, FakeReply, ToolCall  # noqa: E402

TWELVE = "Your order ships today and should arrive within three to five working days."
SYSTEM = "You are the support assistant of an online shop. Answer briefly and kindly. " * 13
HISTORY = [
    {
        "role": "user" if n % 2 == 0 else "assistant",
        "content": f"Message {n} of the conversation so far. " * 6,
    }
    for n in range(7)
]
TOOL_INPUT = {"order_id": "A-10042", "fields": ["status", "eta", "carrier"], "include_history": False}
KINDS: dict[str, tuple[FakeReply, bool]] = {
    "stream12": (FakeReply(text=TWELVE), True),
    "stream1": (FakeReply(text="Sure."), True),
    "whole": (FakeReply(text=TWELVE), False),
    "tool": (FakeReply(text="Let me check.", tool_calls=[ToolCall("lookup_order", TOOL_INPUT)]), True),
}


def load_backend_module(path: Path) -> Any:
    """``agentflow/llm.py`` of another checkout, as a module of this ``agentflow`` package."""
    spec = importlib.util.spec_from_file_location("agentflow._llm_other", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


async def measure(backend: Any, server: FakeAnthropicServer, kind: str, calls: int) -> float:
    """CPU ms per call of ``calls`` calls of ``kind`` (after a few unmeasured ones)."""
    reply, streamed = KINDS[kind]
    server.responder = lambda body: reply
    config = LLMConfig(model="claude-haiku-5-5", max_retries=2, timeout_seconds=60, max_tokens=512)
    pieces: list[str] = []

    async def on_text(text: str) -> None:
        pieces.append(text)

    async def one() -> None:
        answer = await backend.generate(
            system=SYSTEM, messages=HISTORY, config=config, on_text=on_text if streamed else None
        )
        if kind == "tool" and answer.tool_calls[0]["input"] != TOOL_INPUT:
            raise SystemExit(f"wrong tool input: {answer.tool_calls}")

    for _ in range(10):
        await one()
    started = time.thread_time()
    for _ in range(calls):
        await one()
    return (time.thread_time() - started) * 1000 / calls


def measure_threads(backend: Any, server: FakeAnthropicServer, kind: str, calls: int, threads: int) -> float:
    """As ``measure``, on ``threads`` threads at once, each with its own event loop (as Celery's
    worker threads are): the CPU of all of them per call, their switching included."""
    spent: list[float] = []

    def work() -> None:
        loop = asyncio.new_event_loop()
        try:
            per_call = loop.run_until_complete(measure(backend, server, kind, calls // threads))
            spent.append(per_call * (calls // threads))
            loop.run_until_complete(backend.aclose())
        finally:
            loop.close()

    workers = [threading.Thread(target=work) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if len(spent) != threads:
        raise SystemExit(f"{threads - len(spent)} of the {threads} calling threads failed (see above)")
    return sum(spent) / (threads * (calls // threads))


async def run(args: argparse.Namespace, server: FakeAnthropicServer) -> None:
    import anthropic

    from agentflow import llm as this

    other = load_backend_module(args.base)
    backends = {}
    for name, module in (("base", other), ("this", this)):

        def client(module: Any = module) -> Any:
            made = anthropic.AsyncAnthropic(api_key="bench-key", base_url=server.base_url, max_retries=2)
            return module._on_aiohttp(made)

        # One thread: the client given to build(); threads: a client per event loop, as the worker's.
        backend = module.backend_for(client()) if args.threads == 1 else None
        backends[name] = backend or module.AnthropicBackend(client_factory=client)
    results: dict[tuple[str, str], list[float]] = {}
    for round_ in range(args.rounds):
        order = ["base", "this"] if round_ % 2 == 0 else ["this", "base"]
        for kind in KINDS:
            for name in order:
                if args.threads > 1:
                    ms = await asyncio.to_thread(
                        measure_threads, backends[name], server, kind, args.calls, args.threads
                    )
                else:
                    ms = await measure(backends[name], server, kind, args.calls)
                results.setdefault((kind, name), []).append(ms)
        print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    if args.threads == 1:
        for backend in backends.values():
            await backend.aclose()
            await backend.client().close()

    who = "calling thread" if args.threads == 1 else f"{args.threads} calling threads, each its own loop"
    print(f"CPU ms per call ({who}), median of {args.rounds} rounds of {args.calls} calls [min-max]")
    print(f"{'call':<10} {'base':>22} {'this':>22} {'change':>8}")
    for kind in KINDS:
        base, mine = results[(kind, "base")], results[(kind, "this")]
        change = (statistics.median(mine) / statistics.median(base) - 1) * 100
        print(f"{kind:<10} {_cell(base):>22} {_cell(mine):>22} {change:>+7.0f}%")


def _cell(values: list[float]) -> str:
    return f"{statistics.median(values):.3f} [{min(values):.3f}-{max(values):.3f}]"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--base", type=Path, default=Path("/work/wt-base/agentflow/llm.py"))
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="threads calling at once (1)")
    args = parser.parse_args()
    if args.calls < 1 or args.rounds < 1 or not 1 <= args.threads <= args.calls:
        parser.error("--calls and --rounds must be at least 1, --threads from 1 to --calls")
    if not args.base.is_file():
        parser.error(f"--base {args.base} is not a file")
    with FakeAnthropicServer() as server:
        asyncio.run(run(args, server))


if __name__ == "__main__":
    main()
