"""Where a production worker's CPU goes, step by step: loaded into the bench's Celery workers.

``bench/production_load.py --steps`` starts each worker with ``-I worker_steps`` (this module, on the
worker's ``PYTHONPATH``) and ``AGENTFLOW_BENCH_STEPS_DIR``. On import it wraps each step in ``STEPS``
where its callers look it up with a timer of the calling thread's CPU (``time.thread_time``: that
thread's own CPU, not its waits for PostgreSQL, Redis or the GIL; onnxruntime runs on the calling
thread), and when the worker stops it writes the calls and CPU seconds of each step, the turns run
and the threads' CPU (the consumer's main thread, the task threads, all) to
``<dir>/<pid>.json``. Nothing of the product changes; a wrapper costs a few microseconds a call.

py-spy was not used for these figures: on a worker of 128 threads, ``--gil`` gives an idle GIL's
time to its last holder and the default mode counts threads blocked in ``poll`` or a condition
wait as busy (docs/operations.md, "Worker process CPU").

Figures are inclusive: a step's CPU includes the steps it calls (``prepare`` includes the
embedding). Coroutines are timed from start to end on their thread, which runs that one turn, so
their figure includes the database steps ``ThreadSteps`` runs on that thread meanwhile.
"""

from __future__ import annotations

import collections
import functools
import inspect
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from celery.signals import task_prerun, worker_shutdown
from step_wrap import wrap_steps

#: (module, attribute): where the step's callers look it up.
STEPS = (
    ("celery.worker.request", "fast_trace_task"),  # Celery's tracer around the task
    ("conversations.tasks", "process_turn.run"),  # the task (what the tracer calls)
    ("conversations.tasks", "_run_streaming"),
    ("conversations.tasks", "_announce"),
    ("agentflow.loops", "ThreadSteps.drive"),
    ("agentflow.pipeline", "prepare"),
    ("agentflow.pipeline", "_message_of"),
    ("agentflow.pipeline", "decide_and_place"),
    ("agentflow.pipeline", "decide_thread"),
    ("conversations.selectors", "thread_candidates"),
    ("conversations.thread_detection", "stage_opens_subject"),
    ("conversations.turns", "message_place"),
    ("agentflow.pipeline", "_prepared"),
    ("agentflow.embeddings", "MiniLMEmbedder._run"),
    ("agentflow.llm", "AnthropicBackend.generate"),
    ("agentflow.pipeline", "finish"),
    ("conversations.turns", "turn_finish"),
    ("agentflow.channel_layer", "RedisChannelLayer.group_send_blocking"),
    ("django.db.backends.base.base", "BaseDatabaseWrapper.connect"),
    ("celery.worker.request", "Request.acknowledge"),
    ("agentflow_project.broker", "Channel._brpop_read"),
    ("selectors", "EpollSelector.select"),  # an event loop's round: the GIL let go and taken again
)

_steps: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])  # name -> [calls, seconds]
_lock = threading.Lock()
_ready: dict[str, float] = {}


def _count(name: str, seconds: float) -> None:
    with _lock:
        entry = _steps[name]
        entry[0] += 1
        entry[1] += seconds


def _timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.iscoroutinefunction(fn):

        @functools.wraps(fn)
        async def timed_coroutine(*args: Any, **kwargs: Any) -> Any:
            started = time.thread_time()
            try:
                return await fn(*args, **kwargs)
            finally:
                _count(name, time.thread_time() - started)

        return timed_coroutine

    @functools.wraps(fn)
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return fn(*args, **kwargs)
        finally:
            _count(name, time.thread_time() - started)

    return timed


def install() -> None:
    wrap_steps(STEPS, _timed)


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of this process's threads now: the main thread's (Celery's consumer) and all."""
    main, total = 0.0, 0.0
    for tid in os.listdir("/proc/self/task"):
        try:
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        total += seconds
        if int(tid) == os.getpid():
            main = seconds
    return {"main": main, "process": time.process_time(), "threads": total}


@task_prerun.connect
def _on_first_task(**kwargs: Any) -> None:
    """From the first task on: the worker's warm-up (the model's load, a full collection) is no turn's."""
    with _lock:
        if not _ready:
            _steps.clear()
            _ready.update(_thread_cpu())


@worker_shutdown.connect
def _on_shutdown(**kwargs: Any) -> None:
    out = os.environ.get("AGENTFLOW_BENCH_STEPS_DIR")
    if not out:
        return
    now = _thread_cpu()
    with _lock:
        steps = {name: {"calls": calls, "seconds": seconds} for name, (calls, seconds) in _steps.items()}
    record = {
        "pid": os.getpid(),
        "steps": steps,
        # Since the first task: the main thread (Celery's consumer: fetching, decoding, handing
        # tasks to threads) and the whole process (the task threads have ended by now).
        "main_seconds": now["main"] - _ready.get("main", 0.0),
        "process_seconds": now["process"] - _ready.get("process", 0.0),
    }
    Path(out, f"{os.getpid()}.json").write_text(json.dumps(record))


def report(directory: Path) -> list[str]:
    """The lines ``production_load.py --steps`` prints: per worker turn, each step's calls and CPU."""
    records = [json.loads(p.read_text()) for p in sorted(directory.glob("*.json"))]
    if not records:
        return ["worker steps: no worker wrote its figures (was it stopped before it was ready?)"]
    turns = sum(r["steps"].get("tasks.process_turn.run", {}).get("calls", 0) for r in records) or 1
    merged: dict[str, list[float]] = collections.defaultdict(lambda: [0, 0.0])
    for r in records:
        for name, entry in r["steps"].items():
            merged[name][0] += entry["calls"]
            merged[name][1] += entry["seconds"]
    process = sum(r["process_seconds"] for r in records)
    main = sum(r["main_seconds"] for r in records)
    lines = [
        f"worker steps ({len(records)} worker(s), {turns} turns; thread CPU, inclusive, per turn):",
        f"  {'the worker processes, from the first task':48s}         {1000 * process / turns:7.2f} ms",
        f"  {'  of it the main thread (Celery consumer)':48s}         {1000 * main / turns:7.2f} ms",
    ]
    for name, (calls, seconds) in sorted(merged.items(), key=lambda kv: -kv[1][1]):
        lines.append(f"  {name:48s} {calls / turns:5.2f} calls {1000 * seconds / turns:7.2f} ms")
    return lines


if os.environ.get("AGENTFLOW_BENCH_STEPS_DIR"):
    install()
