"""Which thread a user message belongs to, decided cheaply and with its reasons.

1. Explicit cues win: "actually, different question" opens a thread; "back to the login problem"
   returns to the earlier thread it resembles most.
2. Otherwise the learned scorer (conversations.thread_features) gives P(new topic) and
   P(resolution) for the message against the active thread.
3. Targets come from similarity: a resolution ("Thanks, that fixed the login!") resolves the thread
   it talks about, even if another one is active; a new topic that resembles an earlier open thread
   is a RETURN to it; a continuation after the inactivity window returns to the dormant thread.
4. Rules on top of the scorer (task profile) for what support customers write: a fix told as what
   happened ("the box turned up this afternoon", "Ta!") resolves, "not fixed" in any words ("still
   broken", "just the same", "turned up broken") never does, and a question that opens nothing else
   ("who do I ring?") is not taken for an unrelated subject.
5. Rules for topic shifts (task profile): an answer to the assistant's own question ("Where are you
   headed?" -> "I am going to Atlanta") stays in the thread; "One more: ...", "Now find me ..." and a
   request for another action right after the assistant reported the last one done open a new one; so
   does a bare subject of its own mid-thread ("Do you sell gift cards?" after a delivery problem), when
   it uses none of the thread's words and leans on nothing it said ("Is there a fee?" stays), and a
   question of its own about another subject ("Does your app work on Linux?"), also in place of an
   answer to the assistant's question.
6. Outcomes told by the step (task profile): "Flicking airplane mode gave me full bars" resolves; "Pressed
   the keys, the screen went black again" (the step done, the problem left) and a question back with no
   outcome ("is that the one with the green clip?") do not.
7. A second stage for unmarked shifts (task profile): a message the scorer continued is read by a small
   logistic regression fitted on support chats ("Do you do beard trims?" after a refund opens a thread; "Is
   there a cancellation fee?" after a cancellation stays); never a question for a detail of what the thread
   found ("What's the cost per night?").

Every decision carries its confidence and the signals behind it, stored on the message. The
function is pure (no database) so it can be tested and benchmarked alone.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from agentflow.types import ThreadEvent

from .thread_features import (
    MODEL_PATH,
    NOT_FIXED_CUE,
    STOPWORDS,
    ThreadModel,
    ThreadState,
    _cos,
    anything_else_cue,
    content_words,
    fix_cue,
    kept_cue,
    request_cue,
    resolution_cue,
    sentences,
    topic_marker_cue,
)

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

# The not-fixed cue without "again", which also ends fixes ("it's moving again"): for the veto. Whole
# words only: "less" is no cue inside "lesson" ("works in chrome, she's in the lesson now").
STILL_BROKEN = re.compile(
    "(?:" + NOT_FIXED_CUE.pattern.replace(r"|again\b(?! now)", "") + r")\b", re.IGNORECASE
)
still_broken_cue = kept_cue(STILL_BROKEN)
# "Closing" words that may come with a negation and still end the thread ("nope, that's all").
CLOSING = re.compile(
    r"\b(that'?s (all|it|everything)|that was (all|it|everything)|bye|goodbye|nothing else|all set)\b"
    # "Nope, thanks (so much) (for the help)!" and nothing more: a closing, not a "no, not fixed"
    r"|^\s*(no|nope|nah)\b[,.!]?\s*(thanks|thank you)( so much| a lot| much)?( for (the|your|all the) help)?"
    r"[.!]*\s*$",
    re.IGNORECASE,
)

RETURN_SIMILARITY = 0.45  # a new-topic message this close to an earlier open thread goes back to it
RESOLVED_RETURN_SIMILARITY = 0.55  # ... to a resolved one (reopened): closer, a new problem may look alike
# A message that says the matter is still not done ("the navy case hasn't arrived yet", "still no new
# bag") goes back to an earlier open thread rather than on with the active one when it is this close to
# it and this much closer to it than to the active thread.
STATUS_RETURN_SIMILARITY = 0.35
RETURN_OVER_ACTIVE = 0.15
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
    r"\b(but|except)\b,?\s+(now\b|still\b|[^.!?]{0,40}?\b(still|not|n'?t|never|no longer|keeps|stays"
    r"|only (half|part|some)|half|wrong|missing|broken|damaged|crushed|cracked|dented|torn|smashed)\b)",
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


# "Not fixed" said without a negation or "still": "it's beeping just the same", "cold as before",
# "no change", "exactly as before".
SAME_AS_BEFORE = re.compile(
    r"\b((just|exactly|much|pretty much|all) the same|the same as (before|ever|yesterday|last time)"
    r"|(just |exactly )?(as|like) (before|ever|yesterday|last time)|no (change|difference)|unchanged"
    r"|no better|nothing'?s changed|same old|(the )?same as (always|every time|each time))\b",
    re.IGNORECASE,
)
# Nothing came of it: "nothing there", "No text. Nothing on email either", "checked spam too nothing
# there"; or what the step was for is still bad: "the page is still missing", "the box is empty".
NOTHING_CAME = re.compile(
    r"\bnothing (there|on|in|yet|at all|came|arrived|showing|shows|happened)\b"
    r"|\bno (text|texts|email|emails|sms|message|call|reply|code|refund|parcel|delivery)\b(?! (needed|necessary))"
    r"|(?<!nothing )(?<!nothing's )\b(is|are|'s|'re) (still )?(missing|empty|blank|broken|wrong)\b",
    re.IGNORECASE,
)


# What was promised has not come: "the strap hasn't arrived", "the mechanic hasn't turned up", "nobody
# has come about the pellets" (a fix word such as "arrived" inside it is no fix).
NOT_COME_YET = re.compile(
    r"\b(has|have|had)(n'?t| not) (yet )?(arrived|come|turned up|shown up|appeared|been (sent|delivered"
    r"|refunded|credited|fixed|done|processed|posted))\b|\bnobody (has )?(come|turned up|called)\b",
    re.IGNORECASE,
)


# What arrived is itself a problem: "the box turned up broken", "it arrived damaged", "they delivered
# the wrong one".
BAD_ARRIVAL = re.compile(
    r"\b(turned up|showed up|arrived|came|delivered|got (it|them))\b[^.!?]{0,30}?\b(broken|damaged|crushed"
    r"|cracked|dented|smashed|torn|ripped|soaked|wet|leaking|empty|opened|wrong|missing|faulty|defective"
    r"|shattered|bent|scratched|spoiled|melted|incomplete|late|half)\b",
    re.IGNORECASE,
)


# A new symptom after a step: "now the payment page shows an error", "now it crashes at start", "it's
# stuck on the logo now". Something changed; nothing got fixed. ("now the ..." is a fix cue of the
# scorer's, as in "now the page loads".) Not across a negation: "now there are no errors".
NEW_SYMPTOM = re.compile(
    r"\bnow\b(?:(?!\b(no|not|never|without)\b)[^.!?,;]){0,40}?\b(errors?|fails?|failed|failing|crash(es|ed|ing)?"
    r"|broke|broken|stuck|frozen|freez(es|ing)|froze|blank|declined|rejected|refused|locked out)\b"
    r"|\b(shows?|showing|gives?|giving|throws?|throwing|get|gets|getting) (an? |the )?([a-z]+ )?error\b[^.!?,;]{0,15}\bnow\b",
    re.IGNORECASE,
)


# The step done, told first, then what it left: "Pressed the keys, the screen flickered and went black
# again", "Wiped both, it reaches the dock and backs off again", "Did both, it cut out twice on the way
# home". Not a restoration ("Restarted it and it's connecting again", "... came on again") nor a
# symptom denied ("Updated it, no crashes since").
STEP_TOLD = re.compile(
    r"^\W*((ok(ay)?|right|so|yes|yep|done)\W+)?(i\s+)?(just\s+|already\s+)?(did|held|tried|ran|put|set|took"
    r"|[a-z]{3,}ed)\b[^,;]{0,40}?(,|;|\band\b)",
    re.IGNORECASE,
)
STATE_HOLDS = re.compile(r"\b(i'?m|i am|we'?re|we are) [a-z]+ing\b|\bnow\s*[.!]*\s*$", re.IGNORECASE)
AGAIN = re.compile(r"\bagain\b", re.IGNORECASE)
AGAIN_RESTORED = re.compile(
    r"\b([a-z]+(ing|ed)|works?|fine|back|normal|on|up|online|right|properly|fixed|sorted|again and)\s+again\b",
    re.IGNORECASE,
)


def step_left_problem(text: str) -> bool:
    """The customer did the step and tells what is still wrong after it: the problem again, or a
    symptom, with nothing fixed, gone or thanked for."""
    match = STEP_TOLD.match(text)
    if match is None:
        return False
    rest = text[match.end() :]
    if resolution_cue(rest) or PROBLEM_GONE.search(rest) or WORKS_NOW.search(rest) or CLOSING.search(rest):
        return False
    if STATE_HOLDS.search(rest):  # "... and I'm riding with assist again", "the first layer stays down now"
        return False
    if AGAIN.search(rest) and not AGAIN_RESTORED.search(rest):
        return True
    return bool(SYMPTOM_TOLD.search(rest)) and not fix_cue(rest)


# The predicates of a text alone (not_fixed_yet, will_try, outcome_report, came_back) keep their verdicts
# for the latest texts: one decision asks several of its rules of the same message, and they ask each other.
@lru_cache(maxsize=256)
def not_fixed_yet(text: str) -> bool:
    """The customer says it is still broken ("I cleaned it but it still shows E42", "thanks, but
    that didn't help", "beeping just the same", "the box turned up broken"), only partly fixed
    ("it charges now but stays at 10 %") or broken another way ("now the payment page shows an
    error"): never a resolution, whatever the scorer makes of the topic words."""
    if partial_fix(text) or step_left_problem(text):
        return True
    if NEW_SYMPTOM.search(text) and not PROBLEM_GONE.search(text) and not CLOSING.search(text):
        return True
    if (SAME_AS_BEFORE.search(text) or BAD_ARRIVAL.search(text)) and not CLOSING.search(text):
        return True
    if NOTHING_CAME.search(text) and not CLOSING.search(text) and not fix_cue(text):
        return True
    if NOT_COME_YET.search(text) and not CLOSING.search(text):
        return True
    return still_broken_cue(text) and not fix_cue(text) and not CLOSING.search(text)


# The customer will try the step first ("Thanks, I'll try that", "ok, will give it a go tonight",
# "cheers, I'll check and let you know", "trying it now"): nothing is fixed yet, the thanks is for the
# advice. Not "fine, I'll do that, thanks" (a plan accepted, which may end the thread), nor "I'll let
# you know if I need anything else" (a closing), nor a fix told alongside ("That did it, I'll try
# printing the rest now").
WILL_TRY = re.compile(
    r"(?:\b(i'?ll|i will|will|i'?m going to|going to|gonna|let me)\s+(now\s+|just\s+|have to\s+|definitely\s+)?"
    r"(try|give (it|that|this|them) a (go|try|shot|whirl)|test|check|have a (look|go|try)|look into"
    r"|report back|get back to you|let you know (if|whether|how|when)(?! (i|we) need)|attempt)\b"
    r"|\band (report back|get back to you|let you know (if|whether|how)(?! (i|we) need))\b"
    r"|\b(trying|testing|giving (it|that|this) a (go|try|shot|whirl))(?= (it|that|this|those|these) now\b| now\b))"
    r"(\s+(it|that|this|them|those|these|(the|your|a|my) [a-z]+))?(\s+now\b)?",
    re.IGNORECASE,
)


@lru_cache(maxsize=256)
def will_try(text: str) -> bool:
    """The customer is about to try what the assistant suggested: the outcome is still to come."""
    if not WILL_TRY.search(text) or CLOSING.search(text) or re.search(r"\banything else\b", text, re.I):
        return False
    # what the message says besides the plan to try: a fix or an outcome told there wins
    told = WILL_TRY.sub(" ", re.sub(r"\blet you know\b.*", "", text, flags=re.IGNORECASE))
    told = re.sub(r"\b(thanks?|thank you|thx|cheers|ta)\b", " ", told, flags=re.IGNORECASE)
    return not (
        fix_cue(told) or OUTCOME_CUE.search(told) or PROBLEM_GONE.search(told) or WORKS_NOW.search(told)
    )


# A fix told as what happened, with no fix word: something arrived or came back ("the box turned up
# this afternoon", "the refund is on my card now", "the 200 days are back"), a state that holds now
# ("it shows under my vehicles now", "his grades are there", "we're in"), or a short thanks ("Ta!",
# "cheers, sorted"). Only counted when nothing in the message names a problem (PROBLEM_WORD) or asks
# for something.
OUTCOME_CUE = re.compile(
    r"\b(turned up|showed up|shown up|arrived|came (today|this|yesterday|earlier|in the post|through|across|on)"
    r"|(come|coming) (through|across)|(is|are|'s|'re) here\b|delivered|dropped (it |them )?off|landed"
    r"|(?<!you )got (it|them|the|my|his|her|our)\b|(has|have) (it|them) now|'ve got (it|them)|received"
    r"|refunded|credited|reimbursed|(back )?(on|in|into|to) (my|our) (card|account|statement|balance|bank"
    r"|current account)|(is|are|'s|'re) back\b|back (in|on) (my|our)|fixed"
    r"|(is|are|'s|'re) (all )?there\b|(i'?m|we'?re|i am|we are) (in|out|through|back in)\s*(?:[.!,;]|$|and\b)"
    r"|(i'?m|we'?re) on (my|our) way|accepted|approved|went (in|through|off)|unlocked|opens|opened|clicked open"
    r"|lifted|let (me|us) in|connected|paired|synced|(has|have) (held|stayed)|stayed|came on|comes on|kicked in"
    r"|(?<!right )(?<!for )(?<!just )now\s*(?:[.!,;)]|$)|(?<!once )(?<!thanks )(?<!thank you )again\b"
    # a device doing its job again
    r"|(is|are|'s|'re) (warming|heating|cooling|working|running|printing|charging|mowing|brewing|loading|syncing"
    r"|streaming|flowing|draining|spinning|pumping|producing|recording|scanning|taking|coming) ?(up|through|in"
    r"|across|fine|again|properly)?\b|shows? up|brews"
    r"|ta\b|cheers|much appreciated|nice one|legend|lifesaver|spot on|squared away|that was easy"
    # "never mind" as written in a hurry: "nvm, a staff member had it"
    r"|nvm\b)",
    re.IGNORECASE,
)
# What makes such a report a problem after all: "turned up broken", "arrived without the cable",
# "the crackle is back", "charged me again", a negation or a question.
SYMPTOM = (
    r"error|fault|faulty|fail|failed|fails|failing|crash|crashed|crashes"
    r"|broke|broken|crack|cracked|dent|dented|damaged|smashed|torn|scratched|leak|leaks|leaking|drip|drips|stuck"
    r"|jam|jammed|missing|lost|late|delayed|wet|cold|dead|blank|down|offline|slow|lag|lags|laggy"
    r"|stutter|stutters|buffering|flicker|flickers|freeze|freezes|frozen|froze|beep|beeps|beeping|click|clicks"
    r"|clicking|squeal|squeals|squealing|grind|grinding|rattle|rattling|noise|noisy|loud|crackle|hum|whistle"
    r"|whistling|halved|dropped|drops|dropping|disconnects|disconnected|vanished|disappeared|gone|declined"
    r"|rejected|refused|expired|locked|overcharged|charged|twice|problem|issue|trouble|complaint|rash|pain|worse"
)
PROBLEM_WORD = re.compile(
    r"(\b(not|no|never|nothing|nobody|none|cannot|without|only|half|wrong|instead|still|yet|but|though"
    rf"|although|however|except|again and|{SYMPTOM}"
    r"|cant|dont|doesnt|didnt|wont|isnt|wasnt|havent|hasnt|arent|couldnt)\b|n't\b|\?)",
    re.IGNORECASE,
)
# A symptom told, not denied ("no crashes since"): for step_left_problem.
# (The word boundary first: it fails at once inside a word, where the three look-behinds would each be
# tried; the four hold at the same place, so their order changes no match.)
SYMPTOM_TOLD = re.compile(rf"\b(?<!\bno )(?<!\bnot )(?<!\bwithout )({SYMPTOM})\b", re.IGNORECASE)
# "the whistle's gone", "the message disappeared", "the error cleared": the problem went, a fix.
PROBLEM_GONE = re.compile(
    r"\b(error|message|warning|light|icon|alert|banner|noise|sound|whistle|squeal|click(ing)?|beep(ing)?"
    r"|problem|issue|fault|code|crackle|hum|leak|jam|lag)('s| is| has| have| are)? (gone|disappeared|went away"
    r"|cleared|stopped)\b",
    re.IGNORECASE,
)
QUESTION_START = re.compile(
    r"\s*(is|are|do|does|did|can|could|will|would|should|what|where|when|how|who|which|why)\b", re.IGNORECASE
)
SHIFT_WORD = re.compile(r"\b(also|another|else|other|too|as well)\b", re.IGNORECASE)
DONE_AS_ASKED = re.compile(
    r"\s*((ok(ay)?|right|done),?\s*)?(i'?ve|i have|i)\s+(just\s+)?[a-z]+(ed|t|ne)\s+(it|them|that|this)\s+now\s*[.!]*\s*$",
    re.IGNORECASE,
)
DROPPED_OFF = re.compile(r"\bdropped (it |them )?off\b", re.IGNORECASE)
# Asking for something: not a report. (REQUEST_CUE's "where/when/which/what's" are handled by the "?"
# check; it also matches "check", "make", "send" that a report rarely starts with.)
ASKS = re.compile(
    r"\b(can you|could you|would you|will you|can i|could i|how (do|can|will|long|much)|i need|i want|i'd like"
    r"|i would like|please|help me|tell me|show me|find me|get me|book me|let me know)\b",
    re.IGNORECASE,
)


# A greeting and nothing more ("Hello again", "hi there!", "good morning again").
GREETING_ONLY = re.compile(
    r"\s*(hello|hi|hey|hiya|howdy|greetings|good (morning|afternoon|evening|day))\b[\s,!.]*"
    r"((again|there|all|everyone|team|folks)\b[\s,!.]*)*$",
    re.IGNORECASE,
)


@lru_cache(maxsize=256)
def outcome_report(text: str) -> bool:
    """The customer reports that it worked out, in any words ("the box turned up this afternoon",
    "the refund is on my card now", "Ta!"): a positive outcome or thanks, and nothing that names a
    problem, a negation, a question, a request or another subject."""
    if topic_marker_cue(text) or ASKS.search(text) or request_cue(text) or SHIFT_WORD.search(text):
        return False
    if not_fixed_yet(text) or came_back(text) or QUESTION_START.match(text) or will_try(text):
        return False
    if DONE_AS_ASKED.match(text):  # "I've restarted it now": the step is done, the outcome not told
        return False
    if GREETING_ONLY.match(text):  # "Hello again": a user coming back says hello, not that it worked
        return False
    cleaned = PROBLEM_GONE.sub(" fixed ", DROPPED_OFF.sub(" delivered ", text))
    if PROBLEM_WORD.search(cleaned):
        return False
    return bool(OUTCOME_CUE.search(cleaned))


# The problem is back, said outright ("my login is broken again", "it stopped syncing", "the error came
# back"); a bare "again" is not enough: it also ends restorations ("it's moving again").
CAME_BACK = re.compile(
    r"\b((is|are|was|were|'s|'re) (broken|failing|down|wrong|stuck|missing|gone) again|stopped [a-z]+ing"
    r"|came back|coming back|happen(ed|ing|s)? again|reappeared|same (problem|issue|error) (as|again))\b",
    re.IGNORECASE,
)


@lru_cache(maxsize=256)
def came_back(text: str) -> bool:
    """The customer says the problem returned; a closing ("that's all") is not read as one."""
    return bool(CAME_BACK.search(text)) and not CLOSING.search(text)


def same_thread_question(text: str) -> bool:
    """A question with nothing that opens another subject ("who do I ring about it?", "How long does
    the claim take?"): about the thread's own problem, however new its words."""
    is_question = "?" in text or bool(QUESTION_START.match(text))
    return is_question and not (topic_marker_cue(text) or SHIFT_WORD.search(text))


# The assistant asked for a detail of the open request ("Where are you headed?", "Which city should I
# search in?", "What time would you like it?"): the reply gives it, in words the thread has not used yet.
# Not "what else can I do?" or "anything else?", which invite another subject.
SLOT_QUESTION = re.compile(
    r"\b(where|when|what time|what date|what day|which (day|date|city|time|place|airport|station|one|area)"
    r"|what (city|kind|type|sort|area|destination|location)|how many|what is your destination)\b[^?]*\?",
    re.IGNORECASE,
)
OPEN_INVITATION = re.compile(r"\b(else|other|anything|something|further|help|assist|more)\b", re.IGNORECASE)
DECLINE_START = re.compile(r"^\s*(no|nope|not|nah|actually|forget)\b", re.IGNORECASE)


def answers_slot_question(text: str, assistant_text: str) -> bool:
    """The message answers the detail the assistant just asked for ("where are you headed?" -> "I am
    going to Atlanta"): the same request, not a new subject, unless it says so ("also", "by the way",
    "no, ...")."""
    questions = [q for q in sentences(assistant_text) if q.endswith("?")]
    if not questions or not any(SLOT_QUESTION.search(q) for q in questions):
        return False
    if any(OPEN_INVITATION.search(q) for q in questions) or anything_else_cue(assistant_text):
        return False
    return not (
        topic_marker_cue(text)
        or SHIFT_WORD.search(text)
        or NEW_TOPIC_CUES.search(text)
        or DECLINE_START.match(text)
        or "?" in text
    )


# The assistant finished what was asked ("Your table is booked.", "The transfer has been initiated",
# "it went through"): a request for another action after it opens a new thread; questions about what
# was done ("what's the address?", "how much per night?") stay with it.
DONE_REPORT = re.compile(
    r"\b(booked|reserved|confirmed|initiated|scheduled|complete|completed|went through|successful(ly)?"
    r"|has been (made|placed|sent|submitted|processed)|is on (its|it's|the) way|on route)\b",
    re.IGNORECASE,
)
done_report_cue = kept_cue(DONE_REPORT)
ACTION_REQUEST = re.compile(
    r"\b(find|search|look (for|up)|book|reserve|rent|buy|purchase|get me|show|play|put on|pull up|check"
    r"|i (also )?need|i('d| would) (also )?like|i (also )?want)\b",
    re.IGNORECASE,
)
ABOUT_WHAT_WAS_DONE = re.compile(
    r"\b(address|phone|number|contact|cost|costs|price|total|how (long|much|many)|rating|located|location"
    r"|station|confirmation|receipt|details?|time|when|where|it|that|them|this one|the same)\b",
    re.IGNORECASE,
)


def new_request_after_done(text: str, assistant_text: str) -> bool:
    """A request for another action right after the assistant reported the last one done ("Your
    reservation is confirmed." -> "I need bus tickets from NY"); not a question about what was done."""
    if not done_report_cue(assistant_text) or "?" in assistant_text:
        return False
    if not ACTION_REQUEST.search(text) or ABOUT_WHAT_WAS_DONE.search(text):
        return False
    return not (not_fixed_yet(text) or came_back(text))


# A message that opens with another request: "One more: do you deliver to Ireland?", "Now find me the
# cheapest way to ...", "OK, now could you check ...". Not "Now I hear people but ..." (a report) nor
# "now can you reset it?" (a request about the thread's own subject, see REFERS_BACK).
LEAD_IN = r"^\W*((ok(ay)?|great|good|fine|thanks?|thank you|cool|sure|right|yes|and)\W+)*"
REQUEST_OPENER = re.compile(
    LEAD_IN + r"(one more( thing| question| request)?\s*[:,\-\u2013]"
    r"|(now|next),?\s+(please\s+)?(find|search|look|book|reserve|get|show|check|help|tell|send|order|buy|play"
    r"|can you|could you|would you|i want|i need|i'd like|i would like|let's|how about)\b)",
    re.IGNORECASE,
)
ONE_MORE_OPENER = re.compile(LEAD_IN + r"one more", re.IGNORECASE)
REFERS_BACK = re.compile(r"\b(it|that|this|them|those|these|the same|there)\b", re.IGNORECASE)


def opens_another_request(text: str, novelty: float) -> bool:
    """The message starts another request ("One more: ...", "Now find me ..."), in words the thread has
    not used and without pointing back at its subject ("it", "that", "there")."""
    if not REQUEST_OPENER.match(text):
        return False
    if ONE_MORE_OPENER.match(text):
        return True  # "one more: ..." announces the other subject itself
    return novelty >= 0.5 and not REFERS_BACK.search(text)


# An additive opening or word ("Also, ...", "And ...", "Oh and ...", "Plus ...", "... too", "... as well"):
# the message adds something, to this thread ("Also, the light is blinking orange now") or another one
# ("Can you also send me the invoices?"). What is added decides, not the marker.
ADDITIVE = re.compile(
    LEAD_IN + r"(also|oh,? and|plus|and)\b|\balso\b|\b(too|as well)\b(?=\s*([.!?,;)]|$))",
    re.IGNORECASE,
)
# Markers that name another subject by themselves: never taken back by the additive veto.
EXPLICIT_SHIFT = re.compile(
    r"\b(by the way|btw|one more (thing|question)|one last (thing|question)|another (thing|question|issue|matter)"
    r"|separately|unrelated|while i have you|different (question|topic|issue|thing)|quick question|on another note"
    r"|forget (it|that|the))\b|^\W*next\b",
    re.IGNORECASE,
)
# Asking for something to be done or told: "can you / can I / how do I / please / I need ...", not a
# yes-no check of what the thread did ("Will I be charged for the month I missed as well?").
REQUESTS = re.compile(
    r"^\W*((ok(ay)?|great|thanks?|thank you|yes|right|cool|and|also|oh,? and|plus|so)\W+)*"
    r"(can|could|how|what|where|when|which|who|do you|please|find|search|look for|book|reserve|get|show|send"
    r"|tell|give|check)\b"
    r"|\b(can you|could you|would you|please|help me|tell me)\b|\bi\b[^.!?,]{0,20}?\b(need|want|like)\b",
    re.IGNORECASE,
)
# Asking for something, in any form: a question, "can you ...", "please ...", "I need / want / 'd like ...".
WANTS = re.compile(
    r"\?|^\W*((ok(ay)?|great|thanks?|thank you|yes|right|cool|and|also|oh,? and|plus|so)\W+)*"
    r"(is|are|do|does|did|can|could|will|would|should|what|where|when|how|who|which|why|please)\b"
    r"|\b(can you|could you|would you|please|i (also )?(need|want)|i('d| would) (also )?like|help me|tell me)\b",
    re.IGNORECASE,
)
# Pointing back at what the thread is about: "is it insured?", "until then", "him doing that again",
# "the same card", "still". ("them" is left out: "send me my bills, I need them for ...".)
POINTS_BACK = re.compile(
    r"\b(it|its|it's|that|this|those|these|the same|then|again|still|he|she|him|his|her|they|their)\b",
    re.IGNORECASE,
)
# Only the pronouns that stand for the thread's own thing ("is it insured?", "him doing that again",
# "until then"), not "that area" / "there", which a new request uses for the place the last one was about.
POINTS_BACK_STRONGLY = re.compile(
    r"\b(it|its|it's|him|her|he|she|they|their|then|still|again|the same)\b", re.IGNORECASE
)
# Details of what the thread found or did: asking for them continues it ("and the address please").
DETAIL_OF_IT = re.compile(
    r"\b(address|phone number|number|contact|cost|price|total|rating|located|location|confirmation|receipt"
    r"|details?)\b|^\W*((and|also|oh,? and|so|ok(ay)?)\W+)*(how|what) about\b",
    re.IGNORECASE,
)
# A different thing of the same kind: "my other order", "my last parcel", "a second driver".
OTHER_OBJECT = re.compile(
    r"\b(my|our) (other|last|next|previous|old|new|second)\b|\b(another|a second|a different)\b",
    re.IGNORECASE,
)
# Request words that say nothing of the subject: shared with the thread, they do not tie a message to it.
GENERIC_WORDS = frozenset(
    "add added change changed book booked booking send sent check checked order help make use set tell know"
    " new get got thanks thank great please time today tomorrow".split()
)


@lru_cache(maxsize=1 << 14)
def _stem(word: str) -> str:
    """A crude stem, enough to match "refund" with "refunded" and "microphone" with "microphones".
    Kept for the words seen lately: a decision stems each word of the thread's vocabulary several times."""
    for suffix in ("ing", "ed", "es", "s"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 4:
            return word[: -len(suffix)]
    return word


def _stems(vocabulary: AbstractSet[str]) -> frozenset[str]:
    """The stems of a thread's words."""
    return _stems_of(frozenset(vocabulary))


@lru_cache(maxsize=256)
def _stems_of(vocabulary: frozenset[str]) -> frozenset[str]:
    """``_stems``, kept for the latest vocabularies: one decision stems the active thread's words in
    several rules and in the second stage's inputs."""
    return frozenset(_stem(w) for w in vocabulary)


def shared_subject(words: set[str], vocabulary: set[str]) -> set[str]:
    """The message's content words the thread has used (stemmed), request words aside."""
    stems = _stems(vocabulary)
    return {w for w in words if w not in GENERIC_WORDS and _stem(w) in stems}


def adds_another_request(text: str, words: set[str], vocabulary: set[str]) -> bool:
    """An additive marker and a request about something the thread has not talked about ("Can you also
    tell me when my home insurance renews?", "Oh and can I upgrade to the 500 Mb package?", "Please also
    send me the invoices"), not pointing back at it ("Can you also check whether it's insured?") nor
    naming its things ("Also, will the refund go back to the same card?"), unless it says another one of
    them ("my other order")."""
    if not ADDITIVE.search(text) or not REQUESTS.search(text) or POINTS_BACK.search(text):
        return False
    if OTHER_OBJECT.search(text):
        return True
    return not (DETAIL_OF_IT.search(text) or shared_subject(words, vocabulary))


NOW = re.compile(r"\bnow\b", re.IGNORECASE)


def adds_to_thread(text: str, words: set[str], vocabulary: set[str]) -> bool:
    """An additive marker with more of the same subject: "Also, the light is blinking orange now",
    "And can I still pay with my phone until then?", "Also, he says his bank needs a SWIFT code", "Oh
    and the side brush has a broken arm": it points back, names the thread's things, or reports
    something (no request) about them. Not when a marker names another subject ("by the way") or the
    message names another thing of the same kind ("my other order")."""
    if not ADDITIVE.search(text) or EXPLICIT_SHIFT.search(text) or NEW_TOPIC_CUES.search(text):
        return False
    if OTHER_OBJECT.search(text):
        return False
    if REQUESTS.search(text):
        # a request: when it asks about the thread's own thing before naming anything new ("Can you also
        # check whether it's insured?", "And can I still pay ...?", "and their phone number?"), not a new
        # request with its own "it" ("Can you also get me a car? I want to pick it up at ten"); or a detail
        # of it ("and the street address for it?")
        if DETAIL_OF_IT.search(text) and POINTS_BACK_STRONGLY.search(text):
            return True
        return refers_back_first(text, vocabulary)
    # a report: it points back ("he", "it", "the same"; not "this month"), names the thread's things or
    # tells what is happening now ("Also, the light is blinking orange now"); a symptom word alone is no
    # tie ("Also, I was charged twice for ...")
    return bool(POINTS_BACK_STRONGLY.search(text) or shared_subject(words, vocabulary)) or bool(
        NOW.search(text)
    )


FUNCTION_WORDS = frozenset(
    "where when which who whom why whether even here than yet did does don't didn't".split()
)


def refers_back_first(text: str, vocabulary: set[str]) -> bool:
    """A pronoun for the thread's thing ("it", "their", "then", "still", "the same") comes before any
    content word the thread has not used: nothing new stands before it, so it can only mean what the
    thread is about."""
    stems = _stems(vocabulary)
    for match in re.finditer(r"[a-z][a-z']*(?: same)?", text.lower()):
        word = match.group()
        if POINTS_BACK_STRONGLY.fullmatch(word):
            return True
        if (
            len(word) > 2
            and word not in STOPWORDS
            and word not in FUNCTION_WORDS
            and word not in GENERIC_WORDS
            and _stem(word) not in stems
            and not DETAIL_OF_IT.fullmatch(word)
        ):
            return False
    return False


# The assistant asked about the outcome ("Does it work now?", "Did that help?"): a plain "yes" may end it.
OUTCOME_QUESTION = re.compile(
    r"\b(work|works|working|worked|fix|fixed|solved|sorted|help|helped|better|resolved|arrive|arrived|go through"
    r"|went through|show up|showing|there now|come through|try again)\b",
    re.IGNORECASE,
)


# "Anything else?", "What else can I do?", "Can I help with something?": an invitation, not a question.
INVITES_ANOTHER = re.compile(
    r"\b(else|other|further|help|assist)\b|\b(anything|something) (i|we)\b", re.IGNORECASE
)
# "Please send me the booking reference.", "Please confirm your postcode": asks for a detail like a question.
ASKS_FOR_DETAIL = re.compile(
    r"^\s*(please|kindly) (send|confirm|tell|give|share|enter|provide|upload|read)\b", re.IGNORECASE
)


def asked_a_question(assistant_text: str) -> list[str]:
    """The questions (and "please send me ..." requests) of the assistant's last message, unless one
    invites another subject ("anything else?", "what else can I do?")."""
    return list(_questions(assistant_text))


@lru_cache(maxsize=256)
def _questions(assistant_text: str) -> tuple[str, ...]:
    """``asked_a_question``, kept for the latest replies: one decision asks it of the same reply in
    several rules and in the second stage's inputs."""
    questions = [q for q in sentences(assistant_text) if q.endswith("?") or ASKS_FOR_DETAIL.match(q)]
    if any(INVITES_ANOTHER.search(q) for q in questions) or anything_else_cue(assistant_text):
        return ()
    return tuple(questions)


# Something works or runs now, said plainly ("now contactless works", "the backlog is uploading").
WORKS_NOW = re.compile(r"\b(works|working|(is|are|'s|'re) (now )?[a-z]{3,}ing)\b", re.IGNORECASE)


# An offer ("Shall I book it?", "Do you want tickets now?"): a "no, that's all" to it may end the thread.
OFFER = re.compile(
    r"^\s*(do you (want|wish|need)|would you like|shall i|should i|can i|may i|want me to|is there anything)\b",
    re.IGNORECASE,
)


def answers_not_outcome(text: str, assistant_text: str) -> bool:
    """The reply to the assistant's question about a detail ("Is the grey cable in the DSL port?" -> "It
    was half out, I pushed it in"; "Is it unlocked?" -> "It's unlocked"; or a question back) tells no
    outcome: no thanks, no fix word, and no outcome in words the question did not use."""
    questions = [q for q in asked_a_question(assistant_text) if not OFFER.match(q)]
    if not questions or any(OUTCOME_QUESTION.search(q) for q in questions):
        return False
    if resolution_cue(text) or fix_cue(text) or CLOSING.search(text):
        return False
    if WORKS_NOW.search(text) and not PROBLEM_WORD.search(text):
        return False
    asked = {w.lower() for q in questions for w in re.findall(r"[A-Za-z][A-Za-z']+", q)}
    unasked = " ".join(
        w for w in re.findall(r"[A-Za-z][A-Za-z'.!,]*|\S", text) if w.lower().strip(".!,") not in asked
    )
    return not outcome_report(unasked)


# A request or problem this far (or farther) from the thread just resolved is about something else.
AFTER_RESOLUTION_SIMILARITY = 0.35


def new_subject_after_resolution(text: str, words: set[str], novelty: float, similarity: float) -> bool:
    """The thread was just resolved and the customer asks for something or names a problem in words it
    never used ("Do you deliver to the Northside area?", "My controller won't pair with the console."),
    without pointing back at it: another subject. A question about what was resolved ("will it show on
    my statement?") or its problem coming back ("it stopped again") points back or shares its words."""
    if POINTS_BACK.search(text) or novelty < 1.0 or similarity >= AFTER_RESOLUTION_SIMILARITY:
        return False
    if resolution_cue(text) or fix_cue(text) or CLOSING.search(text) or came_back(text):
        return False
    if GREETING_ONLY.match(text) or DECLINE_START.match(text) or outcome_report(text):
        return False
    return bool(WANTS.search(text)) or len(words) >= UNRELATED_MIN_WORDS


# A bare new subject in the middle of a thread (no "also", "by the way", no fix before it): the message
# stands on its own. It asks what the business offers ("Do you sell gift cards?"), how to do something
# with its own object ("How do I pay for the school trip online?"), asks for an action on a thing it
# names ("Skip next week's delivery please"), or states a problem of a thing it names ("My home
# insurance renewal letter says the price has doubled."). A new detail of the same problem leans on the
# thread instead: a pronoun or "one" for its thing ("the broken one"), a continuity word ("still",
# "now", "as well", "in the meantime"), a word of the thread, or a short question whose object the
# thread implies ("Is there a fee?", "Who pays for the hotel tonight?").
OFFERS_QUESTION = re.compile(
    r"^\W*(do|does|can|will) (you|your [a-z]+) (sell|offer|do|have|take|deliver|ship|accept|price[- ]match"
    r"|stock|provide|fix|repair|run|support|carry|hire|rent|insure|cover|lend|install|open)\b",
    re.IGNORECASE,
)
HOW_TO_QUESTION = re.compile(
    r"^\W*((how|where) (do|can|should) (i|we)|(can|could|may) (i|we))\b", re.IGNORECASE
)
OWN_PROBLEM = re.compile(r"^\W*(my|our|i'?ve lost my|i lost my|i have lost my) [a-z]+", re.IGNORECASE)
IMPERATIVE = re.compile(
    r"^\W*(please )?(book|skip|cancel|move|send|order|renew|pause|switch|add|remove|upgrade|downgrade|reserve"
    r"|schedule|register|sign)\b",
    re.IGNORECASE,
)
LEANS_ON_THREAD = re.compile(
    r"\b(it|its|it's|that|this|those|these|them|there|then|same|still|again|now|yet|anymore|even|instead"
    r"|either|too|also|as well|meantime|meanwhile|though|but|rather|other|another|else|one|ones|first|last"
    r"|next time|rest|before|after|done|already|any|anything|something)\b",
    re.IGNORECASE,
)
OWN_SUBJECT_MIN_WORDS = 3
OWN_SUBJECT_SIMILARITY = 0.35


def names_own_subject(text: str, words: set[str], vocabulary: set[str], similarity: float) -> bool:
    """The message opens a subject of its own, in none of the thread's words and leaning on nothing
    the thread said (see OFFERS_QUESTION above)."""
    if len(words) < OWN_SUBJECT_MIN_WORDS or similarity >= OWN_SUBJECT_SIMILARITY:
        return False
    if LEANS_ON_THREAD.search(text) or DETAIL_OF_IT.search(text) or words & vocabulary:
        return False  # (the thread's words, request words included; shared_subject adds stems)
    if shared_subject(words, vocabulary):
        return False
    if resolution_cue(text) or fix_cue(text) or NOT_FIXED_CUE.search(text):
        return False
    return bool(
        OFFERS_QUESTION.match(text)
        or HOW_TO_QUESTION.match(text)
        or IMPERATIVE.match(text)
        or (OWN_PROBLEM.match(text) and "?" not in text)
    )


# A question of its own about another subject, mid-thread and with no marker ("Does the Zenbook 14 come
# in a 32 GB version?" while the fan of a laptop is the thread, "What does the unlimited plan cost?"
# after a data problem), also in place of an answer to the assistant's question ("Which version are
# you running?" -> "Does your app work on Linux?"). The follow-up of the same form leans on the thread:
# a pronoun or "there" for its thing ("Does it blink once it's reset?", "Is there a fee?"), "then",
# "too", "as well", "one", or a word of the thread, the assistant's included ("How long does the
# credit last?" after "I've added a credit").
# The question names its own subject: "Does the / your / my <thing> ...?", "What is the <thing> ...?",
# "How much / often ...", "Do you ...?" (what the business does), "How do I / can I ...?" (how to do
# something). Not a question about what happens next in the thread's own matter, whose subject is a
# person or the process ("Do I keep my old number?", "Will our car space be kept?", "Who pays for the
# hotel tonight?", "What happens if I miss the deadline?", "How long does the transfer take?").
OWN_QUESTION = re.compile(
    r"^\W*((and|so|oh)\W+)?((do|does|is|are|can|should) (the|your|my|our|a|an) [a-z0-9]"
    r"|(what|when|where)( is|'s| are| does| do| should| can) (the|your|my|our|a|an) [a-z0-9]"
    r"|how (much|often|many) (is|are|does|do|should) |do you [a-z]|(how|where) (do|can|should) (i|we) "
    r"|(can|could|may) (i|we) )[^.!]*\?\s*$",
    re.IGNORECASE,
)
QUESTION_LEANS = re.compile(
    r"\b(it|its|it's|that|this|those|these|them|they|their|there|then|same|still|again|too|also|as well|else"
    r"|instead|one|ones|either|anymore|yet|already|both|he|she|him|her|his|such|meantime|meanwhile|mean|here"
    r"|any|anything|something)\b",
    re.IGNORECASE,
)
OWN_QUESTION_NEW_WORDS = 2
OTHER_OF_MINE = re.compile(r"\b(my|our) other\b", re.IGNORECASE)


def asks_own_question(text: str, words: set[str], vocabulary: set[str], similarity: float) -> bool:
    """A self-contained question about a subject the thread never named: at least two content words
    of its own (besides request words and details such as "cost" or "number"), none of the thread's
    words, no pointer back, not close to the thread."""
    if len(words) < OWN_SUBJECT_MIN_WORDS or not OWN_QUESTION.match(text) or QUESTION_LEANS.search(text):
        return False
    if resolution_cue(text) or fix_cue(text) or NOT_FIXED_CUE.search(text):
        return False
    if OTHER_OF_MINE.search(text):
        return True  # "... of my other order?": another one of the thread's things, said outright
    if similarity >= OWN_SUBJECT_SIMILARITY or shared_subject(words, vocabulary) or DETAIL_OF_IT.search(text):
        return False  # ("What's the cost per night?": a detail of what the thread found)
    own = {
        w
        for w in words
        if w not in GENERIC_WORDS and w not in FUNCTION_WORDS and not DETAIL_OF_IT.fullmatch(w)
    }
    return len(own) >= OWN_QUESTION_NEW_WORDS


# A resolution told by what the step did, without a fix word: "Flicking airplane mode gave me full
# bars", "Picking the right class made them all appear", "The reset brought it back". The step (a
# gerund or "the <step>") is the subject of a verb of effect; any problem word, negation or question
# makes it a report of what is still wrong ("Restarting made it worse", "the update gave me an error").
STEP_DID_IT = re.compile(
    r"^\W*((ok(ay)?|so|well|right|yes|yep)\W+)?([a-z]+ing\b|the [a-z][a-z -]{1,30}?)[^,.!?;]{0,40}?"
    r"\b(brought|got|gave|made|put|let|sorted|cleared|fixed|did|set|lined|turned)\b",
    re.IGNORECASE,
)


def step_did_it(text: str) -> bool:
    """What the assistant's step did, told as its effect, and nothing wrong left."""
    if not STEP_DID_IT.match(text) or PROBLEM_WORD.search(text) or not_fixed_yet(text) or will_try(text):
        return False
    return not (ASKS.search(text) or topic_marker_cue(text) or came_back(text))


PRAISE = re.compile(
    r"^\W*(great|perfect|awesome|cool|nice|excellent|wonderful|fantastic|brilliant|amazing|lovely|super)\b",
    re.IGNORECASE,
)


def asks_back(text: str) -> bool:
    """The message ends in a question and tells no thanks, fix, closing or outcome before it ("My
    cable looks fine, is that the one with the green clip?"): the customer is still working on it."""
    if not text.rstrip().endswith("?"):
        return False
    if resolution_cue(text) or fix_cue(text) or CLOSING.search(text) or PRAISE.match(text):
        return False
    told = re.split(r"[,.!;]|\?", text, maxsplit=1)[0]
    return not (
        outcome_report(told) or step_did_it(told) or PROBLEM_GONE.search(text) or WORKS_NOW.search(text)
    )


# Asking after what an earlier request became: "any news on the blue backpack", "any update about my refund?"
STATUS_ASK = re.compile(r"^\W*(any|is there any|still no) (news|update|word|sign)\b", re.IGNORECASE)


def still_waiting(text: str) -> bool:
    """The message says a matter is not done yet or asks after it: still broken, nothing came, or news."""
    return bool(not_fixed_yet(text) or still_broken_cue(text) or STATUS_ASK.search(text))


def _new_or_return(
    others: Sequence[tuple[float, Candidate]], confidence: float, signals: dict[str, Any]
) -> ThreadDecision:
    """A message new for the active thread: back to the closest earlier thread it is close enough to
    (RETURN_SIMILARITY; a resolved one, reopened, RESOLVED_RETURN_SIMILARITY), else a new thread. Every
    way a message is found new for the active thread ends here, so each of them sees earlier threads."""
    close = [
        (s, c) for s, c in others if s >= (RESOLVED_RETURN_SIMILARITY if c.resolved else RETURN_SIMILARITY)
    ]
    if close:
        _, thread = max(close, key=lambda pair: pair[0])
        reason = f"{signals['reason']}; close to an earlier thread"
        return ThreadDecision(ThreadEvent.RETURN, thread.thread_id, confidence, {**signals, "reason": reason})
    return ThreadDecision(ThreadEvent.NEW_TOPIC, None, confidence, signals)


def _back_to_earlier(open_others: Sequence[tuple[float, Candidate]], active_similarity: float) -> Any:
    """An earlier open thread a message the active thread would continue is about instead: close to it
    (STATUS_RETURN_SIMILARITY) and RETURN_OVER_ACTIVE closer than to the active thread ("the navy case still
    hasn't arrived" after a question about luggage scales opened a thread of its own), or None."""
    close = [
        (s, c)
        for s, c in open_others
        if s >= STATUS_RETURN_SIMILARITY and s - active_similarity >= RETURN_OVER_ACTIVE
    ]
    return max(close, key=lambda pair: pair[0])[1] if close else None


BACK_OR_RETURN = re.compile(r"\b(back|return)", re.IGNORECASE)
BACK_TO = re.compile(r"\b(back|return(ing)?) to\b", re.IGNORECASE)
STOPPED_WORKING = re.compile(r"stopped working", re.IGNORECASE)


def decide_thread(
    *,
    text: str,
    embedding: np.ndarray,
    candidates: Sequence[Candidate],
    now: datetime,
    inactivity: timedelta,
    model: ThreadModel,
    embed_reply: Callable[[str], np.ndarray] | None = None,
    stage_margin: float = 0.0,
) -> ThreadDecision:
    """Place a message: FOLLOW_UP, RETURN or RESOLUTION on an existing thread, or NEW_TOPIC.

    Args:
        candidates: most recently active first; the first is the active thread.
        inactivity: a thread idle longer than this no longer takes bare follow-ups.
        model: the profile's scorer.
        embed_reply: the encoder, for the assistant's last reply when the second stage for unmarked
            shifts needs it (task profile); without it the stage is off.
        stage_margin: the LLM may judge a decision whose second-stage P is within this of the
            stage's threshold (``judgement_margin``; 0 offline): the stage's gate then settles only a
            message whose best case is below the threshold minus this, so that P is known for the rest.
    """
    if not candidates:
        return ThreadDecision(ThreadEvent.NEW_TOPIC, None, 1.0, {"reason": "no open thread"})
    active = candidates[0]
    p_new, p_res = model.score(model.features(text, embedding, active.state))
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
    return_cue = RETURN_CUES.search(text) is not None
    if return_cue and best_earlier[1] is not None and best_earlier[0] >= CUED_RETURN_SIMILARITY:
        # the cue names a thread other than the active one: the closest earlier one (not a bare
        # "regarding the ..." that talks about the active thread itself)
        if best_earlier[0] > sims[0] or BACK_OR_RETURN.search(text):
            reason = "return cue" + (" (reopens a resolved thread)" if best_earlier[1].resolved else "")
            return ThreadDecision(
                ThreadEvent.RETURN, best_earlier[1].thread_id, 0.85, {**signals, "reason": reason}
            )
    task = model.profile == "task"
    words = content_words(text)
    if task and return_cue and BACK_TO.search(text):
        # "Back to the toner, which cartridge fits?": the earlier thread that talked of the toner,
        # however far its topic embedding is from this question (and the active one did not)
        named = [(len(shared_subject(words, c.state.vocabulary)), s, c) for s, c in others]
        count, _, thread = max(named, key=lambda item: (item[0], item[1]), default=(0, 0.0, None))
        if count > len(shared_subject(words, active.state.vocabulary)) and thread is not None:
            reason = "return cue naming an earlier thread's subject" + (
                " (reopens a resolved thread)" if thread.resolved else ""
            )
            return ThreadDecision(ThreadEvent.RETURN, thread.thread_id, 0.8, {**signals, "reason": reason})
    recurring = [(s, c) for s, c in others if c.resolved and s >= RECURRENCE_SIMILARITY and s > sims[0]]
    # "stopped working again" is no fix, though "working again" reads as one
    claims_fix = fix_cue(STOPPED_WORKING.sub("", text))
    if RECURRENCE_CUES.search(text) and recurring and not claims_fix:
        similarity, thread = max(recurring, key=lambda pair: pair[0])
        return ThreadDecision(
            ThreadEvent.RETURN,
            thread.thread_id,
            round(similarity, 4),
            {**signals, "reason": "the problem of a resolved thread came back (reopens it)"},
        )
    novelty = len(words - active.state.vocabulary) / max(1, len(words))
    assistant_text = active.state.last_assistant_text
    another_request = task and adds_another_request(text, words, active.state.vocabulary)
    if p_res >= model.resolution.threshold and not_fixed_yet(text):
        signals["resolution_vetoed"] = "not fixed yet"
    elif p_res >= model.resolution.threshold and task and will_try(text):
        signals["resolution_vetoed"] = "will try it first"
    elif p_res >= model.resolution.threshold and task and another_request and not claims_fix:
        signals["resolution_vetoed"] = "asks for something else"
    elif (
        p_res >= model.resolution.threshold
        and task
        and ADDITIVE.match(text)
        and not (claims_fix or resolution_cue(text) or CLOSING.search(text))
    ):
        # "And the charts on the dashboard are empty": adding to the problem, not ending it
        signals["resolution_vetoed"] = "adds to the thread"
    elif p_res >= model.resolution.threshold and task and asks_back(text):
        # "My cable looks fine, is that the one with the green clip?": a question, no outcome told
        signals["resolution_vetoed"] = "asks something back"
    elif p_res >= model.resolution.threshold and task and answers_not_outcome(text, assistant_text):
        signals["resolution_vetoed"] = "answers the assistant's question"
    elif p_res >= model.resolution.threshold and came_back(text) and not claims_fix:
        # "it stopped syncing again", "my login is broken again": the problem is back, whatever thread
        signals["resolution_vetoed"] = "the problem came back"
    elif (p_res >= model.resolution.threshold and p_res >= p_new) or (
        task
        and p_new < model.new_topic.threshold
        and (outcome_report(text) or step_did_it(text))
        and not answers_not_outcome(text, assistant_text)
    ):
        target, reason = active, "resolution of the active thread"
        if (
            best_other[1] is not None
            and best_other[0] >= RESOLVE_OTHER_SIMILARITY
            and best_other[0] > sims[0]
        ):
            target, reason = best_other[1], "resolution of the thread it talks about"
        if p_res < model.resolution.threshold or p_res < p_new:
            reason += " (an outcome reported, not the scorer)"
        return ThreadDecision(
            ThreadEvent.RESOLUTION, target.thread_id, round(p_res, 4), {**signals, "reason": reason}
        )
    answers_question = model.profile == "task" and answers_slot_question(
        text, active.state.last_assistant_text
    )
    if p_new >= model.new_topic.threshold and answers_question and idle <= inactivity:
        return ThreadDecision(
            ThreadEvent.FOLLOW_UP,
            active.thread_id,
            round(1 - p_new, 4),
            {**signals, "reason": "answers the assistant's question (not the scorer)"},
        )
    if (
        p_new >= model.new_topic.threshold
        and task
        and not active.resolved
        and idle <= inactivity
        and adds_to_thread(text, words, active.state.vocabulary)
    ):
        return ThreadDecision(
            ThreadEvent.FOLLOW_UP,
            active.thread_id,
            round(1 - p_new, 4),
            {**signals, "reason": "adds to the active thread (not the scorer)"},
        )
    after_resolved = (
        p_new < model.new_topic.threshold
        and task
        and active.resolved
        and new_subject_after_resolution(text, words, novelty, sims[0])
    )
    after_done = (
        p_new < model.new_topic.threshold
        and model.profile == "task"
        and new_request_after_done(text, active.state.last_assistant_text)
    )
    opener = (
        p_new < model.new_topic.threshold and model.profile == "task" and opens_another_request(text, novelty)
    )
    another_request = another_request and p_new < model.new_topic.threshold
    own_subject = (
        p_new < model.new_topic.threshold
        and task
        and not active.resolved
        and not asked_a_question(assistant_text)
        and names_own_subject(
            text, words, active.state.vocabulary, max(sims[0], _cos(embedding, active.state.last_user))
        )
    )
    own_question = (
        p_new < model.new_topic.threshold
        and task
        and not active.resolved
        and idle <= inactivity
        and not own_subject
        and asks_own_question(
            text, words, active.state.vocabulary, max(sims[0], _cos(embedding, active.state.last_user))
        )
    )
    if (
        p_new >= model.new_topic.threshold
        or after_done
        or opener
        or another_request
        or after_resolved
        or own_subject
        or own_question
    ):
        reason = "scorer: new topic"
        if after_done:
            reason = "a new request after the last one was done (not the scorer)"
        elif opener:
            reason = "opens another request (not the scorer)"
        elif another_request:
            reason = "asks for something else as well (not the scorer)"
        elif after_resolved:
            reason = "another subject after the thread was resolved (not the scorer)"
        elif own_subject:
            reason = "a subject of its own, leaning on nothing the thread said (not the scorer)"
        elif own_question:
            reason = "a question of its own about another subject (not the scorer)"
            if asked_a_question(assistant_text):
                reason = "a question of its own in place of an answer to the assistant's (not the scorer)"
        return _new_or_return(others, round(p_new, 4), {**signals, "reason": reason})
    unrelated = (
        len(words) >= UNRELATED_MIN_WORDS
        and novelty >= UNRELATED_NOVELTY
        and sims[0] < UNRELATED_SIMILARITY
        and not same_thread_question(text)
        and not answers_question
        and not will_try(text)
        and not (
            asked_a_question(assistant_text) and not (ADDITIVE.search(text) or EXPLICIT_SHIFT.search(text))
        )
    )
    if unrelated and model.profile == "task":  # measured: it helps support dialogues, hurts chit-chat
        return _new_or_return(
            others, round(1 - sims[0], 4), {**signals, "reason": "unrelated to the active thread"}
        )
    if idle <= inactivity and active.current_session:
        if task and not active.resolved:
            reading = stage_opens_subject(
                text, embedding, active.state, p_new, embed_reply, margin=stage_margin
            )
            if reading.p is not None:
                signals["p_shift_stage"] = reading.p
            elif reading.p_max is not None:
                signals["p_shift_stage_max"] = reading.p_max
            if reading.opens:
                return _new_or_return(
                    others,
                    float(reading.p or 0.0),
                    {**signals, "reason": "a subject of its own, by the second stage (not the scorer)"},
                )
        back = _back_to_earlier(open_others, sims[0]) if task and still_waiting(text) else None
        if back is not None:
            return ThreadDecision(
                ThreadEvent.RETURN,
                back.thread_id,
                round(1 - p_new, 4),
                {**signals, "reason": "closer to an earlier open thread than to the active one"},
            )
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


# --- the second stage for unmarked topic shifts (task profile) --------------------------------------
#
# A message the scorer continued may still open a subject of its own with no marker ("Do you do beard
# trims?" after a refund, "How do I get a student discount?" after a ride problem). A small logistic
# regression over cues of what the message leans on decides on such messages, fitted on support chats only
# (bench/train_shift_stage.py; weights in data/shift_stage.json): how close it is to the thread's topic
# and to the assistant's last reply (and how much closer to the reply than to the thread), which words of
# the thread it reuses, whether its first content word is new, a pointer back, the forms of a request of
# its own, a question about the thread's own process ("Will I ...?", "How long ...?"), a problem told, and
# what the assistant last did (asked, reported something done, gave a step). It never reads a question
# for a detail of what the thread found ("What's the cost per night?", "the phone number?"): the slot
# dialogues of SGD ask for those, and the stage fitted on support chats took them for new subjects.
# Four cues were dropped when the stage was refitted on chats in other writing styles (docs/operations.md,
# "shift stage, other styles"): the similarity to the last user message and to the opening, reusing a
# word of the reply, and "is a question"; with them, no threshold that changed no SGD dev decision
# gained as many support shifts in the held-out-domain folds. One was added after them, ``bare_fragment``
# (a fragment of one to four words naming a thing, "payment plan?", after a reply that asked nothing):
# terse customers ask about another thing that way (docs/operations.md, "a bare fragment input").
# Three were added for same-business shifts after one exchange (issue 16; docs/operations.md, "shift
# stage, same-business shifts"): ``business_question``, ``leans_first`` and ``reply_words_share`` (below),
# fitted with grafted same-business shifts beside the real rows (bench/train_shift_stage.py ``grafts``).
SHIFT_STAGE_PATH = MODEL_PATH.with_name("shift_stage.json")
SHIFT_STAGE_FEATURES = (
    "sim_topic",
    "p_new",
    "shared_thread",
    "own_words",
    "novelty",
    "first_new",
    "pointer",
    "own_form",
    "process_question",
    "problem",
    "asked",
    "reply_did",
    "reply_step",
    "n_words",
    "bare_fragment",
    "business_question",
    "leans_first",
    "reply_words_share",
    "sim_reply",
    "reply_minus_thread",
)
PROCESS_QUESTION = re.compile(
    r"^\W*((and|so)\W+)?(will|would|do|does|did|should|can|could|am|is|are) (i|we|you|he|she|they)\b"
    r"|^\W*(what happens|how long|how soon|when will|when do|when does|who)\b",
    re.IGNORECASE,
)
# The assistant reported something done ("I've refunded ...", "your booking is confirmed") or gave a step.
REPLY_DID = re.compile(
    r"\b(i'?ve|i have|we'?ve|we have)\s+[a-z]+|\b(is|are|was|were|has been|have been) (now )?[a-z]+ed\b",
    re.IGNORECASE,
)
REPLY_STEP = re.compile(
    r"^\W*(please\s+)?(try|open|go|tap|click|press|hold|turn|check|restart|reset|unplug|plug|clean|run|update"
    r"|use|make|remove|put|set|switch|select|choose|move|bring|send|spray|lift|replace|keep|change|enter|log"
    r"|wipe|add|call|reinstall|clear|rotate|top)\b",
    re.IGNORECASE,
)


# A bare fragment that names a thing and asks nothing else ("payment plan?", "dogs ok?", "happy hour
# times", "luggage storage"): one to four words, not opened by a question word, a pronoun or pointer, an
# answer or acknowledgement ("Sounds good", "Sure, do it", "From March 2nd", "still dead"). Read with
# "the assistant asked nothing": after a question such a fragment is the answer ("Safari 15", "Order
# 88213"), after a statement customers writing tersely use it to ask about something else.
FRAGMENT_LEAD = re.compile(
    r"^\W*(what|where|when|who|whom|which|why|how|is|are|was|were|do|does|did|can|could|will|would|should"
    r"|shall|may|might|must|have|has|had|i|i'?m|im|we|you|u|he|she|it|its|it'?s|they|this|that|these|those"
    r"|there|the|my|our|your|ok|okay|yes|yeah|yep|yup|no|nope|not|thanks|thank|ty|thx|still|same|and|but|so"
    r"|also|just|please|pls|hi|hello|sorry|great|cool|done|tried|nothing|any|anything|something|another|nvm"
    r"|sounds?|sure|alright|all right|right|fine|good|perfect|fantastic|awesome|excellent|lovely|brilliant"
    r"|find|skip|go|try|from|to|in|on|at|for|by|with|after|before|about|around|maybe|probably)\b",
    re.IGNORECASE,
)


# A pick or an acceptance ("Walnut Creek is fine", "baseball is good") or a request to act ("Book the
# hotel", "Show me another option") is no fragment of that kind.
FRAGMENT_ANSWER = re.compile(
    r"\b(fine|good|ok|okay|great|works|sounds|perfect|please)\b"
    r"|^\W*(book|show|play|reserve|get|give|make|tell|buy|pay|send|cancel|order|add|remove|keep|let)\b",
    re.IGNORECASE,
)


def bare_fragment(text: str) -> bool:
    """One to four words naming a thing, with no question word, pointer or acknowledgement in front, and
    no pick, acceptance or request to act."""
    words = re.findall(r"[A-Za-z0-9][\w'-]*", text)
    short = 1 <= len(words) <= 3 or (len(words) == 4 and text.rstrip().endswith("?"))
    return short and not FRAGMENT_LEAD.match(text) and not FRAGMENT_ANSWER.search(text)


# Three cues of a message that stands on its own in the thread's business (issue 16): same-domain
# shifts after one exchange ("do you sharpen lawnmower blades", "Great. Do you hire out men's suits?",
# "Is there parking at the Riverside cinema?") sit close to the thread in embedding, so what tells them
# from a follow-up is the form and what they lean on. ``business_question``: a question about what the
# business offers or when it opens, after at most an acknowledgement ("Do you (still) <verb> ...",
# "What time do you open", "What kind of <thing> do you ...", "Is there <thing> at/in ..."), with no
# pronoun for the thread's thing right after ("Do you have it in blue?" leans).
BUSINESS_QUESTION = re.compile(
    r"^\W*(?:(?:ok(?:ay)?|great|thanks|thank you|cool|perfect|also|and|oh|hi|hey|one more thing)\W+)*"
    r"(?:(?:do|does) (?:you|u|your [a-z]+)(?: guys)?(?: still| also| ever)? (?!know\b|mean\b|think\b|need\b)"
    r"[a-z]+ (?!(?:it|that|this|them|those|these|one|ones|the same|any ?thing|something|another|any other|other|more)\b)"
    r"|what time (?:do|does|are|is) |(?:what|which) (?:kind|sort|type|brand)s? of [a-z]+ (?:do|does|can) you\b"
    r"|(?:is|are) there (?:a |an |any )?[a-z][a-z'-]* (?:[a-z][a-z'-]* )?(?:at|in|near|on|for|during)\b)",
    re.IGNORECASE,
)
# ``leans_first``: a word that leans on the thread (QUESTION_LEANS) comes before the first word of the
# message's own (a content word the thread never used): "does that one work for the laundry room too?"
# leans before it names anything; "The pool cover has a tear along one side, can you replace it?" names
# its thing first and "it" is that thing. Existential "is there" and habitual "do you still" lean on
# nothing and are read past.
LEAN_FREE = re.compile(r"\b(is|are|was|were) there\b|\b(do|does) (you|u) still\b", re.IGNORECASE)


def leans_first(text: str, own: set[str]) -> bool:
    """A leaning word before the first of the message's own words (or with no own word at all)."""
    lowered = LEAN_FREE.sub(" ", text.lower())
    lean = QUESTION_LEANS.search(lowered)
    if lean is None:
        return False
    for match in re.finditer(r"[a-z][a-z']*", lowered):
        if match.group() in own:
            return lean.start() < match.start()
    return True


# ``reply_words_share``: the share of the message's content words (request words aside) that the
# assistant's last reply used ("how do i measure the humidity?" after a step that named the humidity).
def reply_words_share(words: set[str], reply: str) -> float:
    """The share of ``words`` (request words aside) whose stem the assistant's last reply used."""
    asked = {w for w in words if w not in GENERIC_WORDS}
    if not asked:
        return 0.0
    said = {_stem(w) for w in content_words(reply)}
    return sum(_stem(w) in said for w in asked) / len(asked)


# The two inputs that read the reply's embedding; each moves one for one with sim_reply (the cosine of the
# message to ``reply_tail``), the other inputs do not depend on it, so the stage's logit is linear in
# sim_reply with the slope ``ShiftStage.reply_slope`` (tests/conversations/test_thread_shift_stage.py
# checks that shift_stage_features keeps this shape).
_SIM_REPLY = SHIFT_STAGE_FEATURES.index("sim_reply")
_REPLY_MINUS_THREAD = SHIFT_STAGE_FEATURES.index("reply_minus_thread")
# The gate in front of the reply's embedding (issue 13) takes sim_reply at this floor, its best case when
# the logit falls with sim_reply. A cosine can reach -1, but MiniLM's cosines of real text seldom go below
# -0.2: over every pair of a message and the reply before it in our data (support sets, SGD dev, TIAGE
# dev) the lowest is -0.118, and over every text of those sets against every reply tail (186 M pairs)
# -0.286, none below -0.3 (bench/shift_stage_gate.py; docs/operations.md, "A gate in front of the reply's
# embedding"). The gate's verdict is exact whenever the true cosine is at or above the floor; below it (no
# real text measured) the gate could keep a message the stage would have opened.
SIM_REPLY_FLOOR = -0.5


@dataclass(frozen=True)
class ShiftStage:
    """Logistic regression over SHIFT_STAGE_FEATURES (standardised), P(the message opens a subject).

    ``reply_floor``: the lowest sim_reply the gate assumes (None: no gate, the reply always embedded).
    ``reply_slope`` (derived from the weights when loaded): d logit / d sim_reply."""

    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    threshold: float
    version: str
    reply_words: int
    reply_floor: float | None = SIM_REPLY_FLOOR
    reply_slope: float = field(init=False)

    def __post_init__(self) -> None:
        slope = sum(float(self.weights[i] / self.scale[i]) for i in (_SIM_REPLY, _REPLY_MINUS_THREAD))
        object.__setattr__(self, "reply_slope", slope)

    @property
    def gate_floor(self) -> float | None:
        """The sim_reply the gate takes for a message's best case, or None (no gate: the reply is always
        embedded). Only while the logit never rises with sim_reply (slope <= 0) is the floor its best
        case; weights that make it rise (a future retraining) turn the gate off."""
        return self.reply_floor if self.reply_slope <= 0 else None

    def logit(self, x: np.ndarray) -> float:
        return float(((x - self.mean) / self.scale) @ self.weights + self.bias)

    def probability(self, x: np.ndarray) -> float:
        return 1.0 / (1.0 + float(np.exp(-self.logit(x))))


_shift_stage: ShiftStage | None = None


def shift_stage() -> ShiftStage:
    global _shift_stage
    if _shift_stage is None:
        data = json.loads(SHIFT_STAGE_PATH.read_text())
        words = data.get("reply_words")
        if tuple(data["features"]) != SHIFT_STAGE_FEATURES or not isinstance(words, int) or words < 1:
            raise ValueError(
                f"{SHIFT_STAGE_PATH} was fitted on other features (or names no reply_words):"
                " retrain bench/train_shift_stage.py"
            )
        _shift_stage = ShiftStage(
            np.asarray(data["weights"], dtype=np.float64),
            float(data["bias"]),
            np.asarray(data["mean"], dtype=np.float64),
            np.asarray(data["scale"], dtype=np.float64),
            float(data["threshold"]),
            str(data["version"]),
            words,
        )
    return _shift_stage


def _first_word_new(text: str, stems: AbstractSet[str]) -> float:
    """1 when the message's first content word is one the thread never used (the thing it asks about)."""
    for match in re.finditer(r"[a-z][a-z']*", text.lower()):
        word = match.group()
        if len(word) <= 2 or word in STOPWORDS or word in FUNCTION_WORDS or word in GENERIC_WORDS:
            continue
        if QUESTION_LEANS.fullmatch(word):
            return 0.0
        return float(_stem(word) not in stems)
    return 0.0


def shift_stage_features(
    text: str, embedding: np.ndarray, state: ThreadState, p_new: float, reply_embedding: np.ndarray | None
) -> np.ndarray:
    """The second stage's inputs, in SHIFT_STAGE_FEATURES order (``reply_embedding``: the assistant's last
    reply embedded; None gives 0 for the similarity to it)."""
    sim_reply = _cos(embedding, reply_embedding) if reply_embedding is not None else 0.0
    return _with_reply(*_stage_inputs(text, embedding, state, p_new), sim_reply)


def _with_reply(x: np.ndarray, sim_thread: float, sim_reply: float) -> np.ndarray:
    """``x`` with the two inputs that read the reply's embedding set for this ``sim_reply`` (in place);
    ``sim_thread``: the closer of the thread's topic and last user message, from ``_stage_inputs``."""
    x[_SIM_REPLY] = sim_reply
    x[_REPLY_MINUS_THREAD] = sim_reply - sim_thread
    return x


def _stage_inputs(
    text: str, embedding: np.ndarray, state: ThreadState, p_new: float
) -> tuple[np.ndarray, float]:
    """Every input but the two that read the reply's embedding (left at 0: ``_with_reply`` sets them), and
    the message's similarity to the thread (the closer of its topic and its last user message), which
    ``reply_minus_thread`` subtracts from sim_reply."""
    words = content_words(text)
    vocabulary = state.vocabulary
    stems = _stems(vocabulary)
    own = {
        w
        for w in words - vocabulary
        if w not in GENERIC_WORDS
        and w not in FUNCTION_WORDS
        and not DETAIL_OF_IT.fullmatch(w)
        and _stem(w) not in stems
    }
    reply = state.last_assistant_text
    sim_topic, sim_last = _cos(embedding, state.centroid), _cos(embedding, state.last_user)
    return np.asarray(
        [
            sim_topic,
            p_new,
            float(bool(shared_subject(words, vocabulary))),
            min(len(own), 4) / 4,
            len(words - vocabulary) / max(1, len(words)),
            _first_word_new(text, stems),
            float(bool(QUESTION_LEANS.search(text))),
            float(
                bool(
                    OWN_QUESTION.match(text)
                    or OFFERS_QUESTION.match(text)
                    or HOW_TO_QUESTION.match(text)
                    or IMPERATIVE.match(text)
                    or OWN_PROBLEM.match(text)
                )
            ),
            float(bool(PROCESS_QUESTION.match(text))),
            float(bool(SYMPTOM_TOLD.search(text))),
            float(bool(asked_a_question(reply))),
            float(bool(REPLY_DID.search(reply) or done_report_cue(reply))),
            float(bool(REPLY_STEP.match(reply))),
            min(len(words), 8) / 8,
            float(bare_fragment(text) and not asked_a_question(reply)),
            float(bool(BUSINESS_QUESTION.match(text))),
            float(leans_first(text, own)),
            reply_words_share(words, reply),
            0.0,
            0.0,
        ],
        dtype=np.float64,
    ), max(sim_topic, sim_last)


def reply_tail(reply: str, max_words: int) -> str:
    """The piece of the assistant's reply the second stage embeds: its last sentences, whole, up to
    ``max_words`` words (the step or question it ended with is what a next message leans on), or the
    last ``max_words`` words of its last sentence when that alone is longer; at most ``10 * max_words``
    characters (the end of them), for text written without spaces. The encoder's CPU grows with the
    text's length, so a long LLM reply costs no more than a short one here (bench/shift_stage_cpu.py).
    The trainer (bench/train_shift_stage.py) embeds the same piece and stores ``max_words`` with the
    weights (``reply_words`` in data/shift_stage.json)."""
    taken: list[str] = []
    for sentence in reversed(sentences(reply)):
        words = sentence.split()
        if not words:
            continue
        if len(taken) + len(words) > max_words:
            if not taken:
                taken = words[-max_words:]
            break
        taken = words + taken
    return " ".join(taken)[-10 * max_words :]


class StageReading(NamedTuple):
    """What the second stage made of a message the scorer continued.

    ``opens``: it opens a subject of its own. ``p``: the stage's P, when it read the message with the
    reply embedded. ``p_max``: when the gate ruled the message out without embedding the reply, the most
    its P could be (sim_reply at ``SIM_REPLY_FLOOR``; rounded up), below the threshold. Both None when
    the stage did not read the message (a detail of what the thread found, no reply yet, no encoder)."""

    opens: bool
    p: float | None = None
    p_max: float | None = None


def stage_opens_subject(
    text: str,
    embedding: np.ndarray,
    state: ThreadState,
    p_new: float,
    embed_reply: Callable[[str], np.ndarray] | None,
    margin: float = 0.0,
) -> StageReading:
    """Whether the second stage takes a message the scorer continued for a subject of its own, and its
    P. The end of the assistant's reply (``reply_tail``) is embedded here, unless the gate rules the
    message out first: its P with sim_reply at its best case (``ShiftStage.gate_floor``) stays below
    the threshold, so no cosine at or above the floor could open a thread (the gate changes no
    decision for such a cosine). When the gate passes, P comes from the same inputs as without it.
    ``margin``: the gate settles only a message whose best case is below the threshold minus this (a
    message within it of the threshold may be put to the LLM, which needs its P, not a bound)."""
    if DETAIL_OF_IT.search(text) or embed_reply is None:
        return StageReading(False)
    stage = shift_stage()
    tail = reply_tail(state.last_assistant_text, stage.reply_words)
    if not tail:
        return StageReading(False)
    x, sim_thread = _stage_inputs(text, embedding, state, p_new)
    floor = stage.gate_floor
    if floor is not None:
        best = stage.probability(_with_reply(x, sim_thread, floor))
        if best < stage.threshold - margin:
            return StageReading(False, p_max=math.ceil(best * 10_000) / 10_000)
    p = stage.probability(_with_reply(x, sim_thread, _cos(embedding, embed_reply(tail))))
    return StageReading(p >= stage.threshold, round(p, 4))
