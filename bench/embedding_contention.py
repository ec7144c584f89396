"""CPU per embedding when many threads of several processes embed at once: one run at a time or free.

    python bench/embedding_contention.py [--processes 2] [--threads 32] [--seconds 15] [--rounds 2]

A worker runs its turns on many threads, and onnxruntime lets the GIL go while the graph runs, so
without a limit several runs of one process share the cores at once. ``MiniLMEmbedder`` runs one at a
time per process (a lock around ``session.run``); ``free`` swaps that lock for a no-op. Each round
starts ``--processes`` processes of ``--threads`` threads, each thread embedding distinct 20-30-token
texts (``embed_one``, the embedder's cache off) with a short pause between calls, for ``--seconds``;
``lock`` and ``free`` alternate. Prints each process's CPU per embedding (``time.process_time``) and
embeddings a second, and the medians by mode. The figures in docs/operations.md ("Sentence encoder
CPU", "One graph run at a time in a process") came from this load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

WORDS = (
    "card payment declined shop morning refund transfer account balance printer paper jam error login "
    "password reset order delivery parcel courier invoice router signal battery screen update"
).split()


def child(mode: str, threads: int, seconds: float) -> None:
    """One process of the load: print ``<embeddings> <cpu seconds>``."""
    os.environ["AGENTFLOW_EMBEDDER_CACHE_SIZE"] = "0"
    from agentflow.embeddings import MiniLMEmbedder

    embedder = MiniLMEmbedder(threads=1)
    if mode == "free":
        embedder._run_lock = contextlib.nullcontext()  # type: ignore[assignment]
    for _ in range(20):
        embedder.embed_one("a warm-up text of a few words")
    counts: list[int] = []
    start = threading.Barrier(threads + 1)
    stop = [0.0]

    def work(seed: int) -> None:
        rng, done = random.Random(seed), 0
        start.wait()
        while time.monotonic() < stop[0]:
            text = (
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(12, 20))) + f" #{rng.randrange(10**6)}"
            )
            embedder.embed_one(text)
            done += 1
            time.sleep(0.0005)  # a turn does other things between its embeddings
        counts.append(done)

    workers = [threading.Thread(target=work, args=(os.getpid() * 1000 + n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    stop[0] = time.monotonic() + seconds
    cpu = time.process_time()
    start.wait()
    for worker in workers:
        worker.join()
    print(sum(counts), time.process_time() - cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--threads", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--child", choices=["lock", "free"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.threads, args.seconds)
        return
    if min(args.processes, args.threads, args.rounds) < 1 or args.seconds <= 0:
        parser.error("--processes, --threads and --rounds must be at least 1 and --seconds above 0")
    per_mode: dict[str, list[float]] = {"lock": [], "free": []}
    rates: dict[str, list[float]] = {"lock": [], "free": []}
    for round_ in range(1, args.rounds + 1):
        for mode in ("lock", "free"):
            command = [sys.executable, __file__, "--child", mode, "--threads", str(args.threads)]
            command += ["--seconds", str(args.seconds)]
            procs = [
                subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
                for _ in range(args.processes)
            ]
            for proc in procs:
                out, _ = proc.communicate()
                if proc.returncode != 0 or not out.strip():
                    raise SystemExit(f"a {mode} process failed (exit {proc.returncode})")
                count, cpu = out.split()
                per_mode[mode].append(float(cpu) / int(count) * 1000)
                rates[mode].append(int(count) / args.seconds)
                print(
                    f"round {round_} {mode:4s}: {int(count):6d} embeddings, "
                    f"{per_mode[mode][-1]:.2f} ms CPU each, {rates[mode][-1]:.0f}/s"
                )
    for mode in ("lock", "free"):
        print(
            f"{mode:4s} median: {statistics.median(per_mode[mode]):.2f} ms CPU an embedding, "
            f"{statistics.median(rates[mode]):.0f} embeddings/s a process "
            f"({args.processes} processes x {args.threads} threads, {os.cpu_count()} CPUs)"
        )


if __name__ == "__main__":
    main()
