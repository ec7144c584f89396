"""Which thread a user message belongs to, decided cheaply and with its reasons.

1. Explicit cues win: "actually, different question" opens a thread; "back to the login problem"
   returns to the earlier thread it resembles most.
2. Otherwise the learned scorer (conversations.thread_features) gives P(new topic) and
   P(resolution) for the message against the active thread.
3. Targets come from similarity: a resolution ("Thanks, that fixed the login!") resolves the thread
   it talks about, even if another one is active; a new topic that resembles an earlier open thread
   is a RETURN to it; a continuation after the inactivity window returns to the dormant thread.

Every decision carries its confidence and the signals behind it, stored on the message. The
function is pure (no database) so it can be tested and benchmarked alone.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np

from agentflow.types import ThreadEvent

from .thread_features import FIX_CUE, NOT_FIXED_CUE, ThreadModel, ThreadState, content_words, turn_features

NEW_TOPIC_CUES = re.compile(
    r"\b(actually,? (a |one )?(different|another|other|new|unrelated)|different (question|topic|issue|thing)"
    r"|another (question|topic|issue|thing)|new (question|topic|issue)|unrelated|change of (topic|subject)"
    r"|on another note|separate(ly)? (question|issue))\b",
    re.IGNORECASE,
)
RETURN_CUES = re.compile(
    r"\b(back to|going back to|return(ing)? to|about (the|my) (earlier|previous|other|first)|as for the"
    r"|regarding (the|my) (earlier|previous)|(about|regarding|re) (the|my|that|this) [\w' -]{2,30}"
    r"(,|:| again\b)|one (last|more) (thing|question) (about|on|regarding))",
    re.IGNORECASE,
)
# The problem of a thread came back ("the E42 error is back", "it's happening again").
RECURRENCE_CUES = re.compile(
    r"\b((is|are|'s|'re) back\b(?! (up|online|to normal))|came back|come back|coming back|happen(ed|ing|s)? again"
    r"|(is|are|was|it'?s|it is) (broken|failing|down|wrong|stuck|missing|gone) again|again\b(?! now)"
    r"|returned|reappeared|stopped working|same (problem|issue|error) (as|again))",
    re.IGNORECASE,
)

# The not-fixed cue without "again", which also ends fixes ("it's moving again"): for the veto.
STILL_BROKEN = re.compile(NOT_FIXED_CUE.pattern.replace(r"|again\b(?! now)", ""), re.IGNORECASE)
# "Closing" words that may come with a negation and still end the thread ("nope, that's all").
CLOSING = re.compile(r"\b(that'?s (all|it|everything)|bye|goodbye|nothing else|all set)\b", re.IGNORECASE)

RETURN_SIMILARITY = 0.45  # a new-topic message this close to an earlier open thread goes back to it
RESOLVED_RETURN_SIMILARITY = 0.55  # ... to a resolved one (reopened): closer, a new problem may look alike
CUED_RETURN_SIMILARITY = 0.25  # with an explicit "back to ..." (any earlier thread, resolved ones too)
RECURRENCE_SIMILARITY = 0.45  # "... is back again": the resolved thread it talks about is reopened
RESOLVE_OTHER_SIMILARITY = 0.40  # a resolution this close to a non-active thread resolves that one
DORMANT_RETURN_SIMILARITY = 0.30
# A statement of a new problem ("I was charged twice on my invoice") carries no request cue, so the
# task scorer can miss it; nothing in common with the active thread opens a new one anyway.
UNRELATED_SIMILARITY = 0.12
UNRELATED_MIN_WORDS = 4
UNRELATED_NOVELTY = 0.75


@dataclass(frozen=True)
class Candidate:
    """A thread the message may belong to: the user's unresolved threads and the one just resolved."""

    thread_id: Any
    state: ThreadState
    last_activity_at: datetime
    resolved: bool = False
    current_session: bool = True  # False: opened in a session that has since expired


@dataclass(frozen=True)
class ThreadDecision:
    event: str
    thread_id: Any | None  # None: open a new thread; a resolved thread given here is reopened
    confidence: float
    signals: dict[str, Any] = field(default_factory=dict)


# A fix that left (or made) another problem: "the sound is back but now the picture flickers", "the
# light turns red now but the battery stays at 10 %". What follows "but" names a problem unless it is
# itself a fix ("but now it works").
PARTIAL_FIX = re.compile(
    r"\b(but|except)\b,?\s+(now\b|still\b|[^.!?]{0,40}?\b(still|not|n'?t|never|no longer|keeps|stays)\b)",
    re.IGNORECASE,
)
FIXED_AFTER_ALL = re.compile(
    r"\b(works?|working|fixed|solved|sorted|resolved|fine|perfect(ly)?|all good)\b", re.IGNORECASE
)


def partial_fix(text: str) -> bool:
    """Something got better but a problem remains ("X works now, but now Y ...")."""
    match = PARTIAL_FIX.search(text)
    if match is None:
        return False
    return not FIXED_AFTER_ALL.search(text[match.start() :]) and not CLOSING.search(text)


def not_fixed_yet(text: str) -> bool:
    """The customer says it is still broken ("I cleaned it but it still shows E42", "thanks, but
    that didn't help") or only partly fixed ("it charges now but stays at 10 %"): never a
    resolution, whatever the scorer makes of the topic words."""
    if partial_fix(text):
        return True
    return bool(STILL_BROKEN.search(text)) and not FIX_CUE.search(text) and not CLOSING.search(text)


# The problem is back, said outright ("my login is broken again", "it stopped syncing", "the error came
# back"); a bare "again" is not enough: it also ends restorations ("it's moving again").
CAME_BACK = re.compile(
    r"\b((is|are|was|were|'s|'re) (broken|failing|down|wrong|stuck|missing|gone) again|stopped [a-z]+ing"
    r"|came back|coming back|happen(ed|ing|s)? again|reappeared|same (problem|issue|error) (as|again))\b",
    re.IGNORECASE,
)


def came_back(text: str) -> bool:
    """The customer says the problem returned; a closing ("that's all") is not read as one."""
    return bool(CAME_BACK.search(text)) and not CLOSING.search(text)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    norm = float(np.linalg.norm(b))
    return float(a @ b) / norm if norm else 0.0


def decide_thread(
    *,
    text: str,
    embedding: np.ndarray,
    candidates: Sequence[Candidate],
    now: datetime,
    inactivity: timedelta,
    model: ThreadModel,
) -> ThreadDecision:
    """Place a message: FOLLOW_UP, RETURN or RESOLUTION on an existing thread, or NEW_TOPIC.

    Args:
        candidates: most recently active first; the first is the active thread.
        inactivity: a thread idle longer than this no longer takes bare follow-ups.
        model: the profile's scorer.
    """
    if not candidates:
        return ThreadDecision(ThreadEvent.NEW_TOPIC, None, 1.0, {"reason": "no open thread"})
    active = candidates[0]
    p_new, p_res = model.score(turn_features(text, embedding, active.state))
    sims = [round(_cos(embedding, c.state.centroid), 4) for c in candidates]
    idle = now - active.last_activity_at
    signals: dict[str, Any] = {
        "profile": model.profile,
        "model_version": model.version,
        "p_new_topic": round(p_new, 4),
        "p_resolution": round(p_res, 4),
        "similarities": {str(c.thread_id): s for c, s in zip(candidates, sims, strict=True)},
        "active_idle_seconds": round(idle.total_seconds(), 1),
    }
    others = list(zip(sims[1:], candidates[1:], strict=True))
    open_others = [(s, c) for s, c in others if not c.resolved]
    best_other = max(open_others, key=lambda pair: pair[0], default=(0.0, None))
    # Any earlier thread, resolved ones included: a return to one reopens it.
    best_earlier = max(others, key=lambda pair: pair[0], default=(0.0, None))

    if NEW_TOPIC_CUES.search(text):
        return ThreadDecision(ThreadEvent.NEW_TOPIC, None, 0.9, {**signals, "reason": "new-topic cue"})
    if RETURN_CUES.search(text) and best_earlier[1] is not None and best_earlier[0] >= CUED_RETURN_SIMILARITY:
        # the cue names a thread other than the active one: the closest earlier one (not a bare
        # "regarding the ..." that talks about the active thread itself)
        if best_earlier[0] > sims[0] or re.search(r"\b(back|return)", text, re.IGNORECASE):
            reason = "return cue" + (" (reopens a resolved thread)" if best_earlier[1].resolved else "")
            return ThreadDecision(
                ThreadEvent.RETURN, best_earlier[1].thread_id, 0.85, {**signals, "reason": reason}
            )
    recurring = [(s, c) for s, c in others if c.resolved and s >= RECURRENCE_SIMILARITY and s > sims[0]]
    # "stopped working again" is no fix, though "working again" reads as one
    claims_fix = bool(FIX_CUE.search(re.sub(r"stopped working", "", text, flags=re.IGNORECASE)))
    if RECURRENCE_CUES.search(text) and recurring and not claims_fix:
        similarity, thread = max(recurring, key=lambda pair: pair[0])
        return ThreadDecision(
            ThreadEvent.RETURN,
            thread.thread_id,
            round(similarity, 4),
            {**signals, "reason": "the problem of a resolved thread came back (reopens it)"},
        )
    if p_res >= model.resolution.threshold and not_fixed_yet(text):
        signals["resolution_vetoed"] = "not fixed yet"
    elif p_res >= model.resolution.threshold and came_back(text) and not claims_fix:
        # "it stopped syncing again", "my login is broken again": the problem is back, whatever thread
        signals["resolution_vetoed"] = "the problem came back"
    elif p_res >= model.resolution.threshold and p_res >= p_new:
        target, reason = active, "resolution of the active thread"
        if (
            best_other[1] is not None
            and best_other[0] >= RESOLVE_OTHER_SIMILARITY
            and best_other[0] > sims[0]
        ):
            target, reason = best_other[1], "resolution of the thread it talks about"
        return ThreadDecision(
            ThreadEvent.RESOLUTION, target.thread_id, round(p_res, 4), {**signals, "reason": reason}
        )
    if p_new >= model.new_topic.threshold:
        close = [
            (s, c)
            for s, c in others
            if s >= (RESOLVED_RETURN_SIMILARITY if c.resolved else RETURN_SIMILARITY)
        ]
        if close:
            similarity, thread = max(close, key=lambda pair: pair[0])
            return ThreadDecision(
                ThreadEvent.RETURN,
                thread.thread_id,
                round(p_new, 4),
                {**signals, "reason": "new for the active thread, close to an earlier one"},
            )
        return ThreadDecision(
            ThreadEvent.NEW_TOPIC, None, round(p_new, 4), {**signals, "reason": "scorer: new topic"}
        )
    words = content_words(text)
    novelty = len(words - active.state.vocabulary) / max(1, len(words))
    unrelated = (
        len(words) >= UNRELATED_MIN_WORDS and novelty >= UNRELATED_NOVELTY and sims[0] < UNRELATED_SIMILARITY
    )
    if unrelated and model.profile == "task":  # measured: it helps support dialogues, hurts chit-chat
        return ThreadDecision(
            ThreadEvent.NEW_TOPIC,
            None,
            round(1 - sims[0], 4),
            {**signals, "reason": "unrelated to the active thread"},
        )
    if idle <= inactivity and active.current_session:
        return ThreadDecision(
            ThreadEvent.FOLLOW_UP,
            active.thread_id,
            round(1 - p_new, 4),
            {**signals, "reason": "scorer: continues"},
        )
    if sims[0] >= DORMANT_RETURN_SIMILARITY:
        return ThreadDecision(
            ThreadEvent.RETURN,
            active.thread_id,
            round(1 - p_new, 4),
            {**signals, "reason": "back to a dormant thread"},
        )
    return ThreadDecision(
        ThreadEvent.NEW_TOPIC,
        None,
        round(1 - sims[0], 4),
        {**signals, "reason": "the active thread went dormant or its session expired"},
    )
