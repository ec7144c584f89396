"""Which thread a user message belongs to, decided cheaply and with its reasons.

Signals: discourse cues ("actually, different question", "back to", "thanks, that fixed it"),
embedding similarity between the message and each open thread's running topic, and recency.
The decision is a pure function of those signals so it can be tested and benchmarked alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from agentflow.types import ThreadEvent

NEW_TOPIC_CUES = re.compile(
    r"\b(actually,? (a |one )?(different|another|other|new|unrelated)|different (question|topic|issue|thing)"
    r"|another (question|topic|issue|thing)|new (question|topic|issue)|unrelated|change of (topic|subject)"
    r"|something else|on another note|separate(ly)? (question|issue))\b",
    re.IGNORECASE,
)
RETURN_CUES = re.compile(
    r"\b(back to|going back to|return(ing)? to|about (the|my) (earlier|previous|other)|as for the"
    r"|regarding (the|my) (earlier|previous))\b",
    re.IGNORECASE,
)
RESOLUTION_CUES = re.compile(
    r"\b(thanks?|thank you|thx|that (fixed|solved|worked|did it|helped)|(it'?s|is) (working|fixed|solved|resolved)"
    r"|works now|problem solved|all (good|set)|that'?s all|bye|goodbye|never ?mind)\b",
    re.IGNORECASE,
)
REQUEST_CUES = re.compile(r"\?|\b(can you|could you|please|i need|i want|help me|how do|what|where|why)\b", re.I)

FOLLOW_UP_SIMILARITY = 0.30
RETURN_SIMILARITY = 0.45
SHORT_MESSAGE_WORDS = 4


@dataclass(frozen=True)
class Candidate:
    """An unresolved thread the message may belong to."""

    thread_id: Any
    topic_embedding: np.ndarray | None
    last_activity_at: datetime


@dataclass(frozen=True)
class ThreadDecision:
    event: str
    thread_id: Any | None  # None: open a new thread
    confidence: float
    signals: dict[str, Any] = field(default_factory=dict)


def _similarity(vector: np.ndarray, topic: np.ndarray | None) -> float:
    if topic is None:
        return 0.0
    norm = float(np.linalg.norm(topic))
    return float(np.dot(vector, topic) / norm) if norm else 0.0


def decide_thread(
    *,
    text: str,
    embedding: np.ndarray,
    candidates: Sequence[Candidate],
    now: datetime,
    inactivity: timedelta,
) -> ThreadDecision:
    """Place a message: FOLLOW_UP, RETURN, RESOLUTION on an existing thread, or NEW_TOPIC.

    Args:
        candidates: the user's unresolved threads, most recently active first.
        inactivity: a thread idle longer than this no longer receives bare follow-ups.
    """
    words = len(text.split())
    cues = {
        "new_topic": bool(NEW_TOPIC_CUES.search(text)),
        "return": bool(RETURN_CUES.search(text)),
        "resolution": bool(RESOLUTION_CUES.search(text)),
        "request": bool(REQUEST_CUES.search(text)),
    }
    sims = [round(_similarity(embedding, c.topic_embedding), 4) for c in candidates]
    signals: dict[str, Any] = {
        "cues": [name for name, hit in cues.items() if hit],
        "similarities": {str(c.thread_id): s for c, s in zip(candidates, sims, strict=True)},
        "words": words,
    }
    if not candidates:
        return ThreadDecision(ThreadEvent.NEW_TOPIC, None, 1.0, {**signals, "reason": "no open thread"})

    active = candidates[0]
    active_idle = now - active.last_activity_at
    active_fresh = active_idle <= inactivity
    signals["active_idle_seconds"] = round(active_idle.total_seconds(), 1)
    best_index = int(np.argmax(sims))
    best_sim = sims[best_index]

    if cues["resolution"] and not cues["new_topic"] and (not cues["request"] or words <= 6):
        # "Thanks, that fixed the login!" resolves the thread it talks about, even if not the active one.
        target = candidates[best_index] if best_sim >= RETURN_SIMILARITY else active
        return ThreadDecision(
            ThreadEvent.RESOLUTION, target.thread_id, 0.8, {**signals, "reason": "resolution cue"}
        )
    if cues["new_topic"]:
        return ThreadDecision(ThreadEvent.NEW_TOPIC, None, 0.85, {**signals, "reason": "new-topic cue"})

    active_sim = sims[0]
    others = [(s, c) for s, c in zip(sims[1:], candidates[1:], strict=True)]
    best_other = max(others, key=lambda pair: pair[0], default=(0.0, None))
    return_threshold = FOLLOW_UP_SIMILARITY if cues["return"] else RETURN_SIMILARITY
    if best_other[1] is not None and best_other[0] >= return_threshold and best_other[0] > active_sim + 0.05:
        return ThreadDecision(
            ThreadEvent.RETURN,
            best_other[1].thread_id,
            min(1.0, 0.5 + best_other[0] - active_sim),
            {**signals, "reason": "closer to an earlier thread"},
        )
    if active_fresh and (active_sim >= FOLLOW_UP_SIMILARITY or words <= SHORT_MESSAGE_WORDS):
        reason = "similar to the active thread" if active_sim >= FOLLOW_UP_SIMILARITY else "short reply"
        return ThreadDecision(
            ThreadEvent.FOLLOW_UP, active.thread_id, min(1.0, 0.5 + active_sim), {**signals, "reason": reason}
        )
    if not active_fresh and active_sim >= RETURN_SIMILARITY:
        return ThreadDecision(
            ThreadEvent.RETURN, active.thread_id, active_sim, {**signals, "reason": "back to a dormant thread"}
        )
    return ThreadDecision(
        ThreadEvent.NEW_TOPIC,
        None,
        min(1.0, 1.0 - max(best_sim, 0.0)),
        {**signals, "reason": "not similar to any open thread"},
    )
