"""Features and the learned scorer behind thread decisions.

A user message is scored against the thread it would continue (the active one) with cheap
features: cosine similarities to the thread's opening, last user message and running topic,
lexical novelty, discourse cues (thanks/that's all, requests, "also/another", acknowledgements,
the assistant having just asked "anything else?"), whether the previous user message was a
question (read off its stored embedding by a linear probe: an answer rarely opens a topic), support
chat cues (saying what fixed it, "still broken", "by the way / one more thing"), similarity to
resolution / new-topic / not-fixed prototype centroids, and the message's own embedding. The
``chitchat`` profile reads N_CHITCHAT more cues of open talk after those (a question after a statement,
a turn picking up the last one, a question about the partner, ...). Two logistic regressions turn
them into P(new topic) and P(resolution).

The weights live in ``data/thread_model.json`` (with its ``version``), one set per *profile*:
``task`` (support desks, shops, assistants: trained on the Schema-Guided Dialogue dev split and the
tuning part of bench/data/support_turns.jsonl) and ``chitchat`` (open talk: trained on TIAGE
train). ``bench/train_thread_model.py`` rebuilds them from the datasets with this very module, so
training and serving compute the same features."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

MODEL_PATH = Path(__file__).resolve().parent / "data" / "thread_model.json"

RESOLUTION_CUE = re.compile(
    r"\b(thanks?|thank you|thx|cheers|that'?s (all|it|everything)|that is (all|it|everything)|bye|goodbye"
    r"|no,? (that'?s|that is)|nothing else|all set|i'?m (good|done|all set)|i'll be going|that (fixed|solved|worked)"
    r"|(it'?s|is) (working|fixed|solved|resolved)|works now|problem solved)\b",
    re.IGNORECASE,
)
REQUEST_CUE = re.compile(
    r"\b(find|search|look(ing)? (for|up)|book|reserve|rent|buy|order|get me|i need|i want|i'd like|i would like"
    r"|can you|could you|help me|check|show me|play|make|schedule|set up|transfer|send|tell me|how (do|can|will|is)"
    r"|what('?s| is| are)|where|when|which)\b",
    re.IGNORECASE,
)
SHIFT_CUE = re.compile(r"\b(also|another|now|too|as well|different|else|other|instead|new)\b", re.IGNORECASE)
ACK_START = re.compile(
    r"^\s*(yes|yeah|yep|no|nope|ok(ay)?|sure|great|perfect|cool|nice|thanks?|thank you|sounds (good|great)"
    r"|that('s| is| works| sounds))\b",
    re.IGNORECASE,
)
ANYTHING_ELSE = re.compile(
    r"\b(anything else|something else|any other|help you with|help with anything|else i can|more help)\b",
    re.IGNORECASE,
)
WORD = re.compile(r"[a-z][a-z']+")
STOPWORDS = frozenset(
    "i a an the to for me my is are be can you please want need would like it this that there on in at of"
    " and with do what how find some any get look also one am was were have has had not no yes ok okay so"
    " just but or if we our your they them he she his her its from by about as will would could should".split()
)
# Resolution language beyond thank-you/goodbye: saying what fixed it ("switching the port solved it",
# "X did the trick", "it's on my statement now"). Past tense or "now": "that works for me" in a
# booking is a continuation, not a fix.
FIX_CUE = re.compile(
    r"\b(fixed|solved|sorted|resolved|did the trick|did it|that was it|worked|works (now|fine|again|perfectly)"
    r"|(it'?s|it is|they'?re|everything'?s|all) (working|fine|back|clear|in|on|sorted)( now| again)?\b(?! (still|not))"
    r"|working (now|again|fine)|all (good|working|sorted|done)|(got|gets|getting) it( working| back)?"
    r"|went through|arrived|landed|cleared|shows (up|it)|showed up|appeared|back (up|online|to normal)"
    r"|no (more|longer)|now (i|it|we|they|the|my)\b|never mind|nevermind|forget it|figured it out|found it"
    # "never mind" in other words: "oh ignore me, ...", "scratch that", "it was in my spam folder all along"
    r"|ignore (me|(that|this|my) (last )?(message|question))|scratch that"
    r"|(was|were) (in|on|under|attached|there|sitting|right)\b[^.!?]{0,60}\ball along"
    # what stopped is the problem ("switching to HD stopped the freezing"), not the device ("... stopped
    # the printer working", "stopped the app from opening")
    r"|stopped (the|all the|that|those|its|my) [a-z]+\b(?!\s+(from|working|[a-z]+ing)\b)|went away"
    # restored ("it's syncing again", "I can log in again"), not "stopped syncing again"
    r"|(?<!stopped )(?<!not )(?<!n't )(?<!never )\b(syncing|loading|printing|charging|connecting|streaming"
    r"|playing|responding|flowing|running|online) again|\b(i|we) can (?!not\b)[a-z]+( [a-z]+)? again\b)",
    re.IGNORECASE,
)
# Not fixed yet: "still broken", "same error", "that didn't help".
NOT_FIXED_CUE = re.compile(
    r"\b(still|same (error|thing|message|problem|issue|loop)|didn'?t|doesn'?t|does not|did not|isn'?t|won'?t"
    r"|can'?t|cannot|not (working|fixed|solved|loading|showing|there)|no luck|nothing (happens|changed)"
    r"|nope|again\b(?! now)|keeps|only (partly|partially)|but (now|the|it|still)|less|better,? but)",
    re.IGNORECASE,
)
# Discourse markers that open another subject in support chat.
TOPIC_MARKER = re.compile(
    r"(\b(by the way|btw|one more (thing|question)|one last (thing|question)|another (question|thing|issue)"
    r"|(a |one )?(separate|different|unrelated|other) (question|issue|thing|matter|problem)|separately|unrelated"
    r"|while i have you|on another note|totally different|quick question)\b"
    r"|\b(also|forget (it|that|the [a-z]+)),"
    r"|^\s*(and|also|oh,? and|plus) (how|what|where|when|can|could|is|are|do|does|why|who)\b)",
    re.IGNORECASE,
)
# "again" that ends a restoration ("we're back online again", "it's syncing again", "I can log in
# again") is a fix, not a recurrence; "stopped working again", "not loading again" stay recurrences.
RESTORED_AGAIN = re.compile(
    r"(?<!stopped )(?<!not )(?<!n't )(?<!never )"
    r"\b(work(s|ing)?|run(s|ning)?|sync(s|ing)?|load(s|ing)?|print(s|ing)?|charg(es|ing)|connect(s|ing|ed)?"
    r"|stream(s|ing)?|play(s|ing)?|respond(s|ing)?|flow(s|ing)?|online|on the network|back (up|online|in|on)"
    r"|up and running|fine|normal|(can|could|able to) (?!not\b)[a-z]+)"
    r"(?:(?! (error|problem|issue|same|not)\b)[^.!?,;]){0,25}?\bagain\b",
    re.IGNORECASE,
)


def kept_cue(pattern: re.Pattern[str]) -> Callable[[str], bool]:
    """Whether ``pattern`` occurs in a text, kept for the latest texts: one decision asks the same cue of
    the same message (or reply) in several of its rules."""

    @lru_cache(maxsize=256)
    def found(text: str) -> bool:
        return pattern.search(text) is not None

    return found


resolution_cue = kept_cue(RESOLUTION_CUE)
fix_cue = kept_cue(FIX_CUE)
topic_marker_cue = kept_cue(TOPIC_MARKER)
anything_else_cue = kept_cue(ANYTHING_ELSE)
request_cue = kept_cue(REQUEST_CUE)
# Where a text splits into sentences.
SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


@lru_cache(maxsize=256)
def sentences(text: str) -> tuple[str, ...]:
    """The text's sentences (split after ".", "!" or "?"; "" for an empty text), kept for the latest
    texts: one decision splits the assistant's reply in several rules."""
    return tuple(SENTENCE_END.split(text.strip()))


def not_fixed_cue(text: str) -> bool:
    """NOT_FIXED_CUE, with "again" after a restoration ("it's working again") not counted."""
    return bool(NOT_FIXED_CUE.search(RESTORED_AGAIN.sub(" ", text)))


PROTOTYPES = ("resolution", "new_topic", "not_fixed")
N_HAND = 28

# Chit-chat cues (the ``chitchat`` profile only; appended after the embedding, so the task profile's
# features and weights are untouched). In open talk a new topic is mostly a question about the partner
# that follows a statement ("what is your favorite season? mine is winter!", "have you ever watched
# the olympics?"); a turn that picks up the last one starts with a pointer or a reaction ("that is
# cool", "it was in the 100 meter dash", "me too", "lol").
PICKS_UP = re.compile(
    r"^\s*(that|it|they|this|those|these|he|she|them|there|so|same|me too|mine|yes|yeah|yep|no|nope|nah|lol"
    r"|haha|wow|oh|ok(ay)?|sure|cool|nice|really|i agree|agreed|true|right)\b",
    re.IGNORECASE,
)
PERSONAL_QUESTION = re.compile(
    r"\b(what( is|'s| are) your|do you (have|like|love|enjoy|play|watch|listen|work|live|go)|have you (ever|been)"
    r"|are you (a|an|into|married)|where do you|what do you (do|like)|how about you|what about you|do you know)\b",
    re.IGNORECASE,
)
ASKS_BACK = re.compile(r"\b(and you|you\?|how about you|what about you|yourself)\s*\??\s*$", re.IGNORECASE)
ABOUT_ONESELF = re.compile(r"^\s*(i|i'm|i am|my|me)\b", re.IGNORECASE)
OPENS_WITH_QUESTION = re.compile(r"^[^.!]*\?")
N_CHITCHAT = 11


def content_words(text: str) -> set[str]:
    """The text's words of three letters or more, stop words aside (a set of its own: callers may add
    to it)."""
    return set(_content_words(text))


@lru_cache(maxsize=256)
def _content_words(text: str) -> frozenset[str]:
    """``content_words``, kept for the latest texts: one decision reads the message's words in the
    scorer's features, in its rules and in the second stage's inputs."""
    return frozenset(w for w in WORD.findall(text.lower()) if w not in STOPWORDS and len(w) > 2)


@dataclass
class ThreadState:
    """What the scorer knows of the thread a message may continue."""

    opening: np.ndarray
    last_user: np.ndarray
    centroid: np.ndarray  # running sum or mean of user-message embeddings (direction is what counts)
    vocabulary: set[str] = field(default_factory=set)
    last_assistant_text: str = ""
    user_turns: int = 1


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    """``a @ b / |b|``: the cosine for a unit ``a``. ``sqrt(b.dot(b))`` is what ``np.linalg.norm`` computes
    for a vector, without its checks (a decision takes a dozen of these)."""
    nb = float(np.sqrt(b.dot(b)))
    return float(a @ b) / nb if nb else 0.0


_question_probe: tuple[np.ndarray, float] | None = None
_prototypes: np.ndarray | None = None


def prototypes() -> np.ndarray:
    """Unit centroids (one row per entry of PROTOTYPES) of hand-written example sentences of a
    resolution, a new topic and a not-yet-fixed follow-up, embedded when the model was trained."""
    global _prototypes
    if _prototypes is None:
        data = json.loads(MODEL_PATH.read_text())["prototypes"]
        _prototypes = np.asarray([data[name] for name in PROTOTYPES], dtype=np.float32)
    return _prototypes


def set_prototypes(vectors: np.ndarray) -> None:
    """Use these prototype centroids instead of the shipped ones (training)."""
    global _prototypes
    _prototypes = np.asarray(vectors, dtype=np.float32)


def question_probe() -> tuple[np.ndarray, float]:
    """(weights, bias) of the linear probe P(message is a question | its embedding), shared by the
    profiles; only the embedding of the thread's last user message is stored, not its text."""
    global _question_probe
    if _question_probe is None:
        data = json.loads(MODEL_PATH.read_text())["question_probe"]
        _question_probe = (np.asarray(data["weights"], dtype=np.float32), float(data["bias"]))
    return _question_probe


def set_question_probe(weights: np.ndarray, bias: float) -> None:
    """Use this probe instead of the shipped one (training)."""
    global _question_probe
    _question_probe = (np.asarray(weights, dtype=np.float32), float(bias))


def _previous_question(state: ThreadState) -> float:
    """P(the thread's last user message was a question), read off its stored embedding."""
    probe_w, probe_b = question_probe()
    z = min(30.0, max(-30.0, float(state.last_user @ probe_w) + probe_b))
    return 1.0 / (1.0 + float(np.exp(-z)))


def turn_features(text: str, embedding: np.ndarray, state: ThreadState) -> np.ndarray:
    """The scorer's input for one message against one thread: hand features then the embedding."""
    previous_question = _previous_question(state)
    similarity_opening = _cos(embedding, state.opening)
    similarity_last = _cos(embedding, state.last_user)
    similarity_topic = _cos(embedding, state.centroid)
    words = content_words(text)
    novelty = len(words - state.vocabulary) / max(1, len(words))
    several = len([s for s in sentences(text) if s]) > 1
    anything_else = float(anything_else_cue(state.last_assistant_text))
    request = float(request_cue(text))
    shift = float(bool(SHIFT_CUE.search(text)))
    not_fixed = not_fixed_cue(text)
    resolution, fix, topic_marker = resolution_cue(text), fix_cue(text), topic_marker_cue(text)
    hand = [
        similarity_opening,
        similarity_last,
        similarity_topic,
        novelty,
        anything_else,
        float(resolution),
        request,
        shift,
        float("?" in text),
        min(len(text.split()), 30) / 30,
        float(bool(ACK_START.match(text))),
        float(several),
        len(words) / 10,
        min(state.user_turns, 10) / 10,
        previous_question,
        previous_question * similarity_last,
        float(fix),
        float(not_fixed),
        float(topic_marker),
        float(fix and not not_fixed),
        *(prototypes() @ embedding).tolist(),
        float(resolution) * (1.0 - float(topic_marker)),
        # a request about something else: what a topic shift looks like in any domain
        request * (1.0 - similarity_opening),
        request * anything_else,
        shift * (1.0 - similarity_topic),
        novelty * (1.0 - similarity_topic),
    ]
    return np.concatenate([np.asarray(hand, dtype=np.float32), embedding.astype(np.float32)])


def chitchat_features(text: str, embedding: np.ndarray, state: ThreadState) -> np.ndarray:
    """``turn_features`` then N_CHITCHAT cues of open talk: a question after a statement (or a statement
    answering a question), a turn picking up the last one, a question about the partner, asking back,
    talking about oneself, and these against the similarity to the last turn and the thread's length."""
    base = turn_features(text, embedding, state)
    previous_question = _previous_question(state)
    similarity_last = _cos(embedding, state.last_user)
    question = float("?" in text)
    picks_up = float(bool(PICKS_UP.match(text)))
    personal = float(bool(PERSONAL_QUESTION.search(text)))
    chat = [
        question * (1.0 - previous_question),
        previous_question * (1.0 - question),
        picks_up,
        personal,
        float(bool(ASKS_BACK.search(text))),
        float(bool(ABOUT_ONESELF.match(text))),
        float(bool(OPENS_WITH_QUESTION.match(text))),
        personal * (1.0 - similarity_last),
        picks_up * similarity_last,
        question * (1.0 - similarity_last),
        min(state.user_turns, 10) / 10 * (1.0 - similarity_last),
    ]
    return np.concatenate([base, np.asarray(chat, dtype=np.float32)])


FEATURES = {"task": turn_features, "chitchat": chitchat_features}


@dataclass(frozen=True)
class Scorer:
    """Logistic regression over standardised features."""

    weights: np.ndarray
    bias: float
    mean: np.ndarray
    scale: np.ndarray
    threshold: float

    def probability(self, features: np.ndarray) -> float:
        x = features[: self.weights.shape[0]]  # a scorer without embedding weights reads the hand features
        z = float(((x - self.mean) / self.scale) @ self.weights + self.bias)
        return 1.0 / (1.0 + np.exp(-z))


@dataclass(frozen=True)
class ThreadModel:
    profile: str
    new_topic: Scorer
    resolution: Scorer
    version: str = ""
    feature_set: str = "task"  # a key of FEATURES: which features the scorers read

    def features(self, text: str, embedding: np.ndarray, state: ThreadState) -> np.ndarray:
        """The scorers' input for this message against this thread."""
        return FEATURES[self.feature_set](text, embedding, state)

    def score(self, features: np.ndarray) -> tuple[float, float]:
        return self.new_topic.probability(features), self.resolution.probability(features)


def _scorer(data: dict) -> Scorer:
    return Scorer(
        weights=np.asarray(data["weights"], dtype=np.float32),
        bias=float(data["bias"]),
        mean=np.asarray(data["mean"], dtype=np.float32),
        scale=np.asarray(data["scale"], dtype=np.float32),
        threshold=float(data["threshold"]),
    )


@lru_cache(maxsize=4)
def load_model(profile: str, path: str = str(MODEL_PATH)) -> ThreadModel:
    """The shipped weights of a profile (``task`` or ``chitchat``)."""
    data = json.loads(Path(path).read_text())
    if data.get("n_hand") != N_HAND:
        raise ValueError(
            f"{path} was trained for {data.get('n_hand')} hand features, this code computes {N_HAND}:"
            " retrain it with bench/train_thread_model.py"
        )
    if profile not in data["profiles"]:
        raise ValueError(f"unknown threading profile {profile!r}; known: {sorted(data['profiles'])}")
    entry = data["profiles"][profile]
    feature_set = entry.get("features", "task")
    if feature_set not in FEATURES:
        raise ValueError(f"{path}: profile {profile!r} reads unknown features {feature_set!r}")
    return ThreadModel(
        profile,
        _scorer(entry["NEW_TOPIC"]),
        _scorer(entry["RESOLUTION"]),
        str(data.get("version", "")),
        feature_set,
    )


# --- training (used by bench/train_thread_model.py) ------------------------------------------


def fit_logistic(
    x: np.ndarray,
    y: np.ndarray,
    *,
    l2: float | np.ndarray,
    iterations: int = 800,
    rate: float = 0.5,
    sample_weight: np.ndarray | None = None,
) -> tuple[np.ndarray, float, np.ndarray, np.ndarray]:
    """Plain batch gradient descent with L2 (optionally weighted rows); returns (weights, bias, mean, scale).

    ``l2`` may be one strength per feature (e.g. stronger on the embedding dimensions than on the
    hand features)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    xs = (x - mean) / scale
    w = np.zeros(xs.shape[1])
    b = 0.0
    sw = np.ones(len(y)) if sample_weight is None else np.asarray(sample_weight, dtype=float)
    sw = sw / sw.sum()
    for _ in range(iterations):
        p = 1.0 / (1.0 + np.exp(-(xs @ w + b)))
        grad = (p - y) * sw
        w -= rate * (xs.T @ grad + l2 * w)
        b -= rate * float(grad.sum())
    return w, b, mean, scale


def f1(gold: Iterable[bool], predicted: Iterable[bool]) -> float:
    g = np.asarray(list(gold), dtype=bool)
    p = np.asarray(list(predicted), dtype=bool)
    tp = int((g & p).sum())
    return 2 * tp / max(1, int(g.sum() + p.sum()))
