"""CPU of the second stage for unmarked shifts: the whole reply embedded vs its end, and the gate in front
of that embedding.

    python bench/shift_stage_cpu.py [--rounds 6] [--words 150]

``stage_opens_subject`` is called on a message the scorer continued, after an assistant reply of about
``--words`` words (an LLM's typical support answer: a few steps, then a question), with the shipped
weights, in five variants:

* a message that may open a subject ("Do you also sell gift cards?", the gate passes it) with (a) every
  word of the reply embedded and no gate (the stage as first shipped), (b) ``reply_tail`` and no gate
  (``reply_floor`` None: the stage before the gate), (c) ``reply_tail`` and the gate (shipped: what the
  gate adds when it passes);
* a message leaning on the thread that no reply could make a shift ("The notifications are switched on
  already.") with (d) no gate and (e) the gate (shipped: it settles the message without the embedding).

The encoder runs without its cache (the first message after each reply misses it). Alternates the
variants for ``--rounds`` rounds and prints the thread CPU per decision of each round and the medians.
One inference thread (the worker's setting).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
os.environ.setdefault("DJANGO_DEBUG", "true")

STEPS = (
    "Thanks for the details, that helps narrow it down.",
    "First, open the app's settings and check that notifications are switched on for this device.",
    "If they are, sign out, close the app completely and sign back in with the same account.",
    "That refreshes the token we use to reach your phone, which is the usual cause after an update.",
    "You can also check that battery saving is not limiting the app in the background, since some phones "
    "stop deliveries when it is on.",
    "I have also resent the last three alerts from our side so you should see them within a few minutes.",
    "If nothing arrives after that, we can look at your account's delivery log together.",
    "Could you tell me which phone model and app version you are using?",
)


def long_reply(words: int, variant: int) -> str:
    sentences = list(STEPS[:-1])
    text: list[str] = []
    i = variant
    while sum(len(s.split()) for s in text) + len(STEPS[-1].split()) < words:
        text.append(sentences[i % len(sentences)])
        i += 1
    return " ".join([*text, STEPS[-1]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--words", type=int, default=150)
    parser.add_argument("--decisions", type=int, default=40, help="decisions per round and variant")
    args = parser.parse_args()
    import django

    django.setup()
    import numpy as np

    from agentflow.embeddings import get_embedder
    from conversations import thread_detection
    from conversations.thread_detection import reply_tail, shift_stage, stage_opens_subject
    from conversations.thread_features import ThreadState

    embedder = get_embedder()
    shipped = shift_stage()
    ungated = dataclasses.replace(shipped, reply_floor=None)
    shift, leaning = "Do you also sell gift cards?", "The notifications are switched on already."
    variants = {
        "(a) shift, whole reply, no gate": (dataclasses.replace(ungated, reply_words=10**6), shift),
        "(b) shift, reply_tail, no gate": (ungated, shift),
        "(c) shift, reply_tail, gate": (shipped, shift),
        "(d) leaning, no gate": (ungated, leaning),
        "(e) leaning, gate": (shipped, leaning),
    }
    opening = "I stopped getting notifications on my phone after the update."
    v_open = embedder.embed([opening])[0]
    vectors = {shift: embedder.embed([shift])[0], leaning: embedder.embed([leaning])[0]}
    replies = [long_reply(args.words, i) for i in range(args.decisions)]
    print(
        f"{len(replies)} replies of {statistics.median(len(r.split()) for r in replies)} words; "
        f"reply_tail({shipped.reply_words}) keeps {len(reply_tail(replies[0], shipped.reply_words).split())}: "
        f"{reply_tail(replies[0], shipped.reply_words)!r}"
    )

    def embed_reply(text: str) -> np.ndarray:
        return embedder.embed([text])[0]  # no cache: the first message after a reply

    def round_ms(stage, message: str) -> tuple[float, int]:
        """CPU per decision, and how many decisions embedded the reply."""
        thread_detection._shift_stage = stage
        read = 0
        start = time.thread_time()
        for reply in replies:
            state = ThreadState(v_open, v_open, v_open.copy(), {"notifications", "phone", "update"}, reply, 1)
            read += stage_opens_subject(message, vectors[message], state, 0.1, embed_reply).p is not None
        return (time.thread_time() - start) / len(replies) * 1000, read

    for stage, message in variants.values():
        round_ms(stage, message)  # warm up
    figures: dict[str, list[float]] = {name: [] for name in variants}
    embedded: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, (stage, message) in variants.items():
            ms, embedded[name] = round_ms(stage, message)
            figures[name].append(ms)
    thread_detection._shift_stage = shipped
    for name, values in figures.items():
        rounds = " ".join(f"{x:.2f}" for x in values)
        print(
            f"  {name:32s} {rounds}  median {statistics.median(values):.3f} ms CPU per decision"
            f" (spread {min(values):.3f}-{max(values):.3f}; reply embedded {embedded[name]}/{len(replies)})"
        )
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
