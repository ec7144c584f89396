"""Confidence and escalation rules: whether the agent answers, asks, or hands the thread to a human.

A threshold is the confidence the agent needs to answer alone (the category's threshold, else the
configuration's ``intent_specific``, else ``default_threshold``). ``0.0`` and ``handoff=True`` both
mean "always a human", so the seed's ``ESCALATION: 0.0`` reads as written. Below the threshold the
category's ``on_low_confidence`` policy applies: a human takes the thread, or the agent asks the
user which of the likely intents they mean. Messages with no intent (out of scope) and resolutions
go to the LLM as they are.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from agentflow.config import ConfidenceConfig
from agentflow.types import Classification, IntentCategory, ThreadEvent

ANSWER, HANDOFF, CLARIFY = "answer", "handoff", "clarify"


@dataclass(frozen=True)
class ConfidenceAction:
    action: str  # answer | handoff | clarify
    threshold: float
    reason: str = ""


def confidence_action(
    *,
    classification: Classification,
    category: IntentCategory | None,
    config: ConfidenceConfig,
    thread_event: str,
) -> ConfidenceAction:
    intent = classification.intent
    threshold = config.threshold_for(intent, category.threshold if category else None)
    if intent is None or thread_event == ThreadEvent.RESOLUTION:
        return ConfidenceAction(ANSWER, threshold)
    if category is not None and category.handoff:
        return ConfidenceAction(HANDOFF, threshold, f"intent {intent} is always handed to a human")
    if threshold == 0.0:
        return ConfidenceAction(HANDOFF, threshold, f"intent {intent} has threshold 0 (always a human)")
    if classification.confidence < threshold:
        reason = f"confidence {classification.confidence:.2f} below the {intent} threshold {threshold:.2f}"
        policy = category.on_low_confidence if category is not None else HANDOFF
        return ConfidenceAction(CLARIFY if policy == CLARIFY else HANDOFF, threshold, reason)
    return ConfidenceAction(ANSWER, threshold)


def clarifying_question(classification: Classification, categories: dict[str, IntentCategory]) -> str:
    """Ask which of the likely intents the user means, in the categories' own words."""
    names = [classification.intent, *(s.name for s in classification.runners_up)]
    options: list[str] = []
    for name in names:
        category = categories.get(name or "")
        if category is None or len(options) == 3:
            continue
        options.append((category.description or category.name.replace("_", " ").lower()).rstrip("."))
    if len(options) < 2:
        return "I want to get this right: could you tell me a bit more about what you need?"
    listed = ", ".join(f'"{o}"' for o in options[:-1]) + f' or "{options[-1]}"'
    return f"I want to get this right: is your question about {listed}?"


# --- the reply's confidence ---------------------------------------------------------------------

SELF_ASSESSMENT_INSTRUCTION = (
    "Begin your answer with <confidence>X</confidence> on its own first line, where X, from 0 to 1, is how "
    "sure you are that you can answer this user correctly and completely. It is removed before the user sees "
    "it; a low value hands the conversation to a member of staff."
)
# The model is asked to assess itself first (so a confident reply can stream at once); a tag at the
# end is accepted too.
LEADING_SELF_ASSESSMENT = re.compile(r"^\s*<confidence>\s*([01](?:\.\d+)?)\s*</confidence>\s*", re.IGNORECASE)
SELF_ASSESSMENT = re.compile(r"\s*<confidence>\s*([01](?:\.\d+)?)\s*</confidence>\s*$", re.IGNORECASE)
WEIGHTS = {"classification": 0.6, "self_assessment": 0.4}
RETRIEVAL_BOOST = 0.25  # a matching memory closes up to a quarter of the remaining doubt


def split_self_assessment(text: str) -> tuple[str, float | None]:
    """The reply without its leading (or trailing) ``<confidence>`` tag, and the model's own confidence."""
    match = LEADING_SELF_ASSESSMENT.match(text)
    if match is not None:
        return text[match.end() :], min(1.0, float(match.group(1)))
    match = SELF_ASSESSMENT.search(text)
    if match is None:
        return text, None
    return text[: match.start()].rstrip(), min(1.0, float(match.group(1)))


def reply_confidence(
    *, classification: float, self_assessment: float | None, retrieval: float | None
) -> tuple[float, dict[str, float]]:
    """How far to trust a reply before it is sent.

    The weighted mean of the intent's (calibrated) classification confidence and the LLM's own
    assessment when it gave one; a memory used for the reply (its similarity) can only add support.
    Returns the score and the signals behind it.
    """
    parts = {"classification": classification}
    if self_assessment is not None:
        parts["self_assessment"] = self_assessment
    score = sum(WEIGHTS[k] * v for k, v in parts.items()) / sum(WEIGHTS[k] for k in parts)
    if retrieval is not None:
        parts["retrieval"] = retrieval
        score += (1 - score) * RETRIEVAL_BOOST * retrieval
    return round(score, 4), parts
