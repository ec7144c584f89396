"""The second stage for unmarked topic shifts (issue 16): a message the scorer continued that opens a
subject of its own with no marker ("Do you do beard trims?" after a refund for a haircut) opens a thread;
the message of the same form that leans on the thread ("Is there a cancellation fee?" after a
cancellation) stays, and so does a question for a detail of what the thread found ("What's the cost per
night?"). Through the agent and the real database, as ``Agent.detect_thread`` places messages; cases
from the tuning support chats (bench/train_shift_stage.py)."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable

import numpy as np
import pytest

from agentflow import AgentFrameworkBuilder
from conversations import thread_detection
from conversations.models import Message, Thread
from conversations.thread_detection import (
    BUSINESS_QUESTION,
    SIM_REPLY_FLOOR,
    StageReading,
    bare_fragment,
    leans_first,
    reply_tail,
    reply_words_share,
    shift_stage,
    shift_stage_features,
    stage_opens_subject,
)
from conversations.thread_features import ThreadState, content_words, load_model

STAGE = "a subject of its own, by the second stage (not the scorer)"


async def _agent(profile: str = "task", **session: object):
    return await (
        AgentFrameworkBuilder()
        .with_intent_categories([])
        .with_config(
            {"name": f"stage-{profile}", "session_config": {"threading_profile": profile, **session}}
        )
        .build(None)
    )


async def _place(agent, user: str, problem: str, reply: str, text: str) -> tuple[dict, dict]:
    opened = await agent.detect_thread(user_id=user, message=problem)
    await agent.record_message(user_id=user, content=reply)
    return opened, await agent.detect_thread(user_id=user, message=text)


CASES = [
    # a subject of its own right after a fix, and the same form leaning on the thread
    (
        "I got a double booking charge for my haircut.",
        "I've refunded the duplicate £35.",
        "Do you do beard trims?",
        "NEW_TOPIC",
    ),
    (
        "The scooter stopped in the middle of my ride.",
        "It hit the no-ride zone boundary; I've refunded the ride.",
        "How do I get a student discount?",
        "NEW_TOPIC",
    ),
    (
        "I need to cancel my appointment tomorrow.",
        "Done, your 3pm appointment is cancelled.",
        "Is there a cancellation fee?",
        "FOLLOW_UP",
    ),
    (
        "My water softener is showing an E3 error.",
        "Check the salt level and top it up if it's below the water line.",
        "Which salt tablets do you recommend?",
        "FOLLOW_UP",
    ),
    # a detail of what the thread found: never read by the stage (SGD's slot dialogues ask for these)
    (
        "Book me a hotel room in Portland for two nights.",
        "Your rooms were successfully booked.",
        "What's the cost per night?",
        "FOLLOW_UP",
    ),
]


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize(("problem", "reply", "text", "expected"), CASES)
async def test_a_continued_message_of_its_own_opens_a_thread_and_one_leaning_on_it_stays(
    problem: str, reply: str, text: str, expected: str
) -> None:
    agent = await _agent()

    opened, placed = await _place(agent, "stage-user", problem, reply, text)

    assert placed["thread_event"] == expected, placed["signals"]
    stored = await Message.objects.aget(user__external_id="stage-user", content=text)
    assert (stored.thread_event, str(stored.thread_id) == opened["thread_id"]) == (
        expected,
        expected == "FOLLOW_UP",
    )
    assert await Thread.objects.filter(user__external_id="stage-user").acount() == (
        2 if expected == "NEW_TOPIC" else 1
    )
    if expected == "NEW_TOPIC":
        assert placed["signals"]["reason"] == STAGE
        assert placed["signals"]["p_shift_stage"] >= shift_stage().threshold
        assert placed["signals"]["p_new_topic"] < load_model("task").new_topic.threshold


@pytest.mark.django_db(transaction=True)
async def test_the_stage_is_for_the_task_profile_only() -> None:
    chitchat = await _agent("chitchat")

    _, placed = await _place(
        chitchat,
        "stage-chat",
        "I got a double booking charge for my haircut.",
        "I've refunded the duplicate £35.",
        "Do you do beard trims?",
    )

    assert placed["signals"]["reason"] != STAGE
    assert "p_shift_stage" not in placed["signals"]


@pytest.mark.django_db(transaction=True)
async def test_an_agent_can_turn_the_stage_off_and_then_embeds_no_reply(monkeypatch) -> None:
    """``session_config.shift_stage: false`` (the CPU of one short embedding a continued turn saved):
    the message the stage would open a thread for stays a follow-up, and no reply is embedded."""
    agent = await _agent(shift_stage=False)
    embedded: list[str] = []
    real = agent.embedder.embed_one
    monkeypatch.setattr(agent.embedder, "embed_one", lambda text: embedded.append(text) or real(text))

    _, placed = await _place(agent, "stage-off", *CASES[0][:3])

    assert placed["thread_event"] == "FOLLOW_UP"
    assert "p_shift_stage" not in placed["signals"]
    assert CASES[0][1] not in embedded and reply_tail(CASES[0][1], shift_stage().reply_words) not in embedded
    assert await Thread.objects.filter(user__external_id="stage-off").acount() == 1


@pytest.mark.parametrize("value", ["sometimes", 2, None])
def test_a_bad_shift_stage_setting_is_refused_naming_the_field(value: object) -> None:
    from pydantic import ValidationError

    from agentflow.config import SessionConfig

    with pytest.raises(ValidationError, match="shift_stage"):
        SessionConfig(shift_stage=value)


def _state(problem: str, reply: str) -> tuple[ThreadState, np.ndarray]:
    from agentflow.embeddings import get_embedder

    vector = get_embedder().embed_one(problem)
    return ThreadState(
        vector, vector, vector.copy(), content_words(problem) | content_words(reply), reply
    ), vector


def _vector(text: str) -> np.ndarray:
    from agentflow.embeddings import get_embedder

    return get_embedder().embed_one(text)


def _recording_encoder() -> tuple[list[str], Callable[[str], np.ndarray]]:
    """The real encoder, with the texts it was asked to embed kept in order."""
    asked: list[str] = []

    def embed(text: str) -> np.ndarray:
        asked.append(text)
        return _vector(text)

    return asked, embed


def test_the_stage_reads_the_reply_only_for_messages_it_may_place() -> None:
    asked, embed = _recording_encoder()

    state, _ = _state("I got a double booking charge for my haircut.", "I've refunded the duplicate £35.")
    shift = stage_opens_subject(
        "Do you do beard trims?", _vector("Do you do beard trims?"), state, 0.05, embed
    )
    leaning = stage_opens_subject(
        "How long until I see the money?",
        _vector("How long until I see the money?"),
        state,
        0.05,
        embed,
    )
    detail = stage_opens_subject(
        "What's the total cost now?", _vector("What's the total cost now?"), state, 0.05, embed
    )
    off = stage_opens_subject("Do you do beard trims?", _vector("Do you do beard trims?"), state, 0.05, None)
    no_reply = stage_opens_subject(
        "Do you do beard trims?",
        _vector("Do you do beard trims?"),
        _state("I got a double booking charge for my haircut.", "")[0],
        0.05,
        embed,
    )

    assert shift.opens is True and shift.p is not None and shift.p >= shift_stage().threshold
    assert leaning.opens is False and leaning.p is not None and leaning.p < shift_stage().threshold
    # a detail of what was found; no encoder; no reply
    assert detail == off == no_reply == StageReading(False, None, None)
    assert asked == ["I've refunded the duplicate £35."] * 2


def _use_stage_file(tmp_path, monkeypatch, data: dict) -> None:
    """The stage loads ``data`` (a shift_stage.json's content) as its file, from the next shift_stage()."""
    path = tmp_path / "shift_stage.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(thread_detection, "SHIFT_STAGE_PATH", path)
    monkeypatch.setattr(thread_detection, "_shift_stage", None)


def test_a_stage_file_fitted_on_other_features_is_refused(tmp_path, monkeypatch) -> None:
    data = json.loads(thread_detection.SHIFT_STAGE_PATH.read_text())
    data["features"] = data["features"][:-1]
    _use_stage_file(tmp_path, monkeypatch, data)

    with pytest.raises(ValueError, match="other features"):
        shift_stage()


@pytest.mark.parametrize("words", [None, 0, "24"])
def test_a_stage_file_without_a_reply_length_is_refused(tmp_path, monkeypatch, words) -> None:
    data = json.loads(thread_detection.SHIFT_STAGE_PATH.read_text())
    if words is None:
        del data["reply_words"]
    else:
        data["reply_words"] = words
    _use_stage_file(tmp_path, monkeypatch, data)

    with pytest.raises(ValueError, match="reply_words"):
        shift_stage()


STEPS = (
    "Thanks for the details. First open the app's settings and check that notifications are on for this "
    "device. If they are, sign out, close the app and sign back in. I have also resent the last alerts "
    "from our side. "
)


def test_reply_tail_keeps_the_last_whole_sentences_up_to_the_limit() -> None:
    reply = STEPS * 5 + "Which phone model are you using?  And which app version?"

    assert reply_tail(reply, 12) == "Which phone model are you using? And which app version?"
    assert reply_tail(reply, 16) == "Which phone model are you using? And which app version?"
    assert reply_tail(reply, 24) == (
        "I have also resent the last alerts from our side. Which phone model are you using? And which app version?"
    )
    assert reply_tail("  I've refunded the duplicate £35.\n", 24) == "I've refunded the duplicate £35."


def test_reply_tail_bounds_bad_input() -> None:
    run_on = " ".join(f"word{i}" for i in range(500))  # one sentence, no punctuation
    no_spaces = "払い戻しが完了しました" * 100  # 1,100 characters, no spaces, no latin punctuation

    assert reply_tail("", 24) == reply_tail("   \n\t ", 24) == ""
    assert reply_tail("...", 24) == "..."
    assert reply_tail(run_on, 24) == " ".join(f"word{i}" for i in range(476, 500))
    assert reply_tail(no_spaces, 24) == no_spaces[-240:]
    assert reply_tail("¿Algo más? Ihre Rückerstattung über 35 € ist unterwegs.", 24) == (
        "¿Algo más? Ihre Rückerstattung über 35 € ist unterwegs."
    )
    assert reply_tail("¿Algo más? Ihre Rückerstattung über 35 € ist unterwegs.", 7) == (
        "Ihre Rückerstattung über 35 € ist unterwegs."
    )


def test_the_stage_embeds_only_the_end_of_a_long_reply() -> None:
    asked, embed = _recording_encoder()

    long_reply = STEPS * 6 + "Is there anything else on the notifications I can check?"
    state, _ = _state("I stopped getting notifications after the update.", long_reply)
    message = "Do you sell gift cards?"
    opens, p, _ = stage_opens_subject(message, _vector(message), state, 0.05, embed)
    blank, _ = _state("I stopped getting notifications after the update.", " \n ")
    skipped = stage_opens_subject(message, _vector(message), blank, 0.05, embed)

    assert len(long_reply.split()) > 150
    assert asked == [reply_tail(long_reply, shift_stage().reply_words)]
    assert asked[0].endswith("I can check?") and len(asked[0].split()) <= shift_stage().reply_words
    assert p is not None and opens == (p >= shift_stage().threshold)
    assert skipped == StageReading(False, None, None)  # a reply of blanks is no reply: nothing embedded


# --- the gate in front of the reply's embedding (issue 13) ----------------------------------------

REFUND = ("I got a double booking charge for my haircut.", "I've refunded the duplicate £35.")
SOFTENER = (
    "My water softener is showing an E3 error.",
    "Check the salt level and top it up if it's below the water line.",
)


def _ungated() -> thread_detection.ShiftStage:
    return dataclasses.replace(shift_stage(), reply_floor=None)


def _read(stage, text: str, problem_reply: tuple[str, str]) -> tuple[StageReading, list[str]]:
    """The stage's reading of ``text`` (p_new 0.05) with ``stage`` in place, and the texts it embedded."""
    asked, embed = _recording_encoder()
    state, _ = _state(*problem_reply)
    previous = thread_detection._shift_stage
    thread_detection._shift_stage = stage
    try:
        return stage_opens_subject(text, _vector(text), state, 0.05, embed), asked
    finally:
        thread_detection._shift_stage = previous


@pytest.mark.parametrize(
    ("text", "problem_reply"),
    [("yes", SOFTENER), ("The salt is at the line already.", SOFTENER)],
)
def test_the_gate_settles_a_message_no_reply_could_make_a_shift_without_embedding_the_reply(
    text: str, problem_reply: tuple[str, str]
) -> None:
    gated, asked = _read(shift_stage(), text, problem_reply)
    ungated, asked_ungated = _read(_ungated(), text, problem_reply)

    assert asked == [] and asked_ungated == [problem_reply[1]]
    assert gated.opens is ungated.opens is False
    assert gated.p is None and ungated.p is not None and ungated.p_max is None
    assert gated.p_max is not None and ungated.p <= gated.p_max < shift_stage().threshold


@pytest.mark.parametrize(
    ("text", "problem_reply"),
    [
        ("Do you do beard trims?", REFUND),
        ("Is there a cancellation fee?", REFUND),
        ("How long until I see the money?", REFUND),
    ],
)
def test_a_message_the_gate_passes_is_read_as_without_it(text: str, problem_reply: tuple[str, str]) -> None:
    gated, asked = _read(shift_stage(), text, problem_reply)
    ungated, asked_ungated = _read(_ungated(), text, problem_reply)

    assert gated == ungated and gated.p is not None and gated.p_max is None
    assert asked == asked_ungated == [problem_reply[1]]


def test_the_stage_inputs_move_with_sim_reply_one_for_one() -> None:
    """The gate's premise: the logit is linear in sim_reply with the slope derived from the weights."""
    state, _ = _state(*REFUND)
    message = _vector("Do you do beard trims?")
    near, far = _vector("Yes, we do beard trims as well."), _vector("What a lovely sunny day it is.")
    x_near = shift_stage_features("Do you do beard trims?", message, state, 0.05, near)
    x_far = shift_stage_features("Do you do beard trims?", message, state, 0.05, far)
    reply_inputs = [
        thread_detection.SHIFT_STAGE_FEATURES.index(n) for n in ("sim_reply", "reply_minus_thread")
    ]
    moved = float(x_near[reply_inputs[0]] - x_far[reply_inputs[0]])
    stage = shift_stage()

    assert abs(moved) > 0.1
    assert np.flatnonzero(x_near != x_far).tolist() == reply_inputs
    assert np.allclose(x_near[reply_inputs] - x_far[reply_inputs], [moved, moved], atol=1e-12)
    assert stage.logit(x_near) - stage.logit(x_far) == pytest.approx(stage.reply_slope * moved, abs=1e-9)
    assert stage.reply_slope < 0 and stage.gate_floor == SIM_REPLY_FLOOR


def _stage_file(tmp_path, monkeypatch, sim_reply: float, reply_minus_thread: float) -> None:
    data = json.loads(thread_detection.SHIFT_STAGE_PATH.read_text())
    for name, weight in (("sim_reply", sim_reply), ("reply_minus_thread", reply_minus_thread)):
        data["weights"][data["features"].index(name)] = weight
    _use_stage_file(tmp_path, monkeypatch, data)


def test_weights_that_make_the_logit_rise_with_the_reply_turn_the_gate_off(tmp_path, monkeypatch) -> None:
    """A retrained file whose logit rises with sim_reply: the floor is no best case, every reply embedded."""
    _stage_file(tmp_path, monkeypatch, sim_reply=0.3, reply_minus_thread=-0.1)
    stage = shift_stage()

    reading, asked = _read(stage, "The salt is at the line already.", SOFTENER)

    assert stage.reply_slope > 0 and stage.gate_floor is None
    assert asked == [SOFTENER[1]] and reading.p is not None and reading.p_max is None


def test_the_gate_follows_the_sum_of_the_reply_weights_not_their_signs(tmp_path, monkeypatch) -> None:
    """One reply weight positive, the logit still falling with sim_reply: the gate stays on."""
    _stage_file(tmp_path, monkeypatch, sim_reply=0.05, reply_minus_thread=-0.4)
    stage = shift_stage()

    reading, asked = _read(stage, "The salt is at the line already.", SOFTENER)

    assert stage.reply_slope < 0 and stage.gate_floor == SIM_REPLY_FLOOR
    assert asked == [] and reading.p is None and reading.p_max is not None


def test_the_gate_is_exact_only_above_its_floor() -> None:
    """What the floor buys: an encoder whose cosine to the message falls below it (no real text measured
    does) could have opened a thread the gate settled without asking; above the floor nothing changes."""
    state, _ = _state(*SOFTENER)
    text = "The salt is at the line already."
    message = _vector(text)
    stage = shift_stage()
    opposite = lambda _: -message  # noqa: E731  (cosine -1)

    previous = thread_detection._shift_stage
    try:
        thread_detection._shift_stage = _ungated()
        below = stage_opens_subject(text, message, state, 0.05, opposite)
        thread_detection._shift_stage = stage
        gated = stage_opens_subject(text, message, state, 0.05, opposite)
    finally:
        thread_detection._shift_stage = previous

    assert below.p is not None and gated.p_max is not None and below.p > gated.p_max
    assert gated.opens is False and gated.p is None


@pytest.mark.django_db(transaction=True)
async def test_a_message_the_gate_settles_stores_the_bound_not_a_p() -> None:
    """Stored signals: ``p_shift_stage_max`` (the most P could be) instead of ``p_shift_stage``."""
    agent = await _agent()

    _, settled = await _place(agent, "gate-user", *SOFTENER, "The salt is at the line already.")
    _, read = await _place(agent, "gate-user-2", *CASES[0][:3])

    assert settled["thread_event"] == "FOLLOW_UP" and settled["signals"]["reason"] == "scorer: continues"
    assert "p_shift_stage" not in settled["signals"]
    assert 0 < settled["signals"]["p_shift_stage_max"] < shift_stage().threshold
    stored = await Message.objects.aget(
        user__external_id="gate-user", content="The salt is at the line already."
    )
    assert stored.thread_signals["p_shift_stage_max"] == settled["signals"]["p_shift_stage_max"]
    assert read["signals"]["p_shift_stage"] >= shift_stage().threshold
    assert "p_shift_stage_max" not in read["signals"]


# --- a bare fragment naming another thing ("payment plan?", "luggage storage") after a statement: terse
# customers ask about something else that way; after the assistant's question the same form is an answer.

MAT = ("my yoga mat arrived with a tear in it", "Sorry about that, I've sent a replacement mat today.")
MAT_ASKED = ("my yoga mat arrived with a tear in it", "Sorry about that. Which colour was the mat?")


@pytest.mark.parametrize(
    ("text", "bare"),
    [
        ("gift vouchers?", True),
        ("student discount", True),
        ("warranty on toasters?", True),
        ("kids swim lessons?", True),
        # an answer, an acknowledgement, a pick, a request to act, a question with its own lead-in
        ("Sounds good.", False),
        ("Sure, do it.", False),
        ("Walnut Creek is fine.", False),
        ("Book the hotel.", False),
        ("From March 2nd", False),
        ("still dead", False),
        ("What about gift vouchers?", False),
        ("Is there parking?", False),
        # longer than a fragment: four words without a question mark, five or more
        ("late nights and longnecks", False),
        ("do you sell gift vouchers", False),
        ("", False),
        ("?!", False),
    ],
)
def test_bare_fragment_reads_one_to_four_words_naming_a_thing(text: str, bare: bool) -> None:
    assert bare_fragment(text) is bare


def test_the_fragment_input_counts_only_when_the_assistant_asked_nothing() -> None:
    column = thread_detection.SHIFT_STAGE_FEATURES.index("bare_fragment")
    after = {}
    for name, problem_reply in (("statement", MAT), ("question", MAT_ASKED)):
        state, _ = _state(*problem_reply)
        after[name] = shift_stage_features("gift vouchers?", _vector("gift vouchers?"), state, 0.05, None)

    assert (after["statement"][column], after["question"][column]) == (1.0, 0.0)


@pytest.mark.parametrize("text", ["gift vouchers?", "student discount"])
def test_a_bare_fragment_after_a_statement_opens_a_subject_by_its_input(text: str) -> None:
    """With the fragment's weight at 0 (the stage as it was) these stay follow-ups; the answer to the
    assistant's question ("dark green") stays one with it."""
    stage = _ungated()
    column = thread_detection.SHIFT_STAGE_FEATURES.index("bare_fragment")
    weights = stage.weights.copy()
    weights[column] = 0.0

    with_input, _ = _read(stage, text, MAT)
    without, _ = _read(dataclasses.replace(stage, weights=weights), text, MAT)
    answer, _ = _read(stage, "dark green", MAT_ASKED)

    assert (with_input.opens, without.opens, answer.opens) == (True, False, False), (with_input, without)


@pytest.mark.parametrize(
    ("text", "asks"),
    [
        ("do you sharpen lawnmower blades", True),
        ("Great. Do you hire out men's suits?", True),
        ("Do you still do 2-for-1 on Tuesdays?", True),
        ("what time do you open on sundays", True),
        ("What kind of underlay do you use for stairs?", True),
        ("Is there parking at the Riverside cinema?", True),
        # a pronoun for the thread's thing, a question about the customer's own matter, no question
        ("Do you have it in blue?", False),
        ("Do you have anything else with wifi?", False),
        ("Do you have any other options?", False),
        ("Do you need my ticket number?", False),
        ("How many days until I see the money?", False),
        ("The salt tank is full already.", False),
    ],
)
def test_business_question_reads_a_question_about_what_the_business_offers(text: str, asks: bool) -> None:
    assert bool(BUSINESS_QUESTION.match(text)) is asks


@pytest.mark.parametrize(
    ("text", "own", "leans"),
    [
        ("does that one work for the laundry room too?", {"laundry", "room"}, True),
        ("The pool cover has a tear along one side, can you replace it?", {"pool", "cover", "tear"}, False),
        ("Is there parking at the Riverside cinema?", {"parking", "riverside"}, False),
        ("Do you still do 2-for-1 on Tuesdays?", {"tuesdays"}, False),
        ("still wrong", set(), True),
        ("Do you hire out suits?", {"suits"}, False),
    ],
)
def test_leans_first_reads_a_leaning_word_before_the_message_names_its_own_thing(
    text: str, own: set[str], leans: bool
) -> None:
    assert leans_first(text, own) is leans


def test_reply_words_share_counts_the_message_words_the_reply_used() -> None:
    reply = "Keep the room's humidity between 40 and 50 percent and I'll retune it next month."

    assert reply_words_share(content_words("how do i measure the humidity?"), reply) == 0.5
    assert reply_words_share(content_words("do you sharpen lawnmower blades"), reply) == 0.0
    assert reply_words_share(set(), reply) == 0.0


TAILOR = (
    "Is my wedding dress alteration ready? Ticket 5520.",
    "It's ready for the final fitting; we need about 30 minutes with you.",
)
TRIMMER = (
    "The hedge trimmer I bought last week won't start.",
    "Make sure the safety lock on the handle is pressed in while you squeeze the trigger.",
)


@pytest.mark.parametrize(
    ("text", "problem_reply"),
    [("Great. Do you hire out men's suits?", TAILOR), ("do you sharpen lawnmower blades", TRIMMER)],
)
def test_a_same_business_question_of_its_own_opens_a_subject_by_the_new_inputs(
    text: str, problem_reply: tuple[str, str]
) -> None:
    """Issue 16: a question of its own in the thread's business after one exchange. With the three
    inputs of what it leans on at weight 0 it stays a follow-up; a question leaning on the refund stays
    one with them."""
    stage = _ungated()
    weights = stage.weights.copy()
    for name in ("business_question", "leans_first", "reply_words_share"):
        weights[thread_detection.SHIFT_STAGE_FEATURES.index(name)] = 0.0

    with_inputs, _ = _read(stage, text, problem_reply)
    without, _ = _read(dataclasses.replace(stage, weights=weights), text, problem_reply)
    lean, _ = _read(stage, "How many days until I see the money?", REFUND)

    assert (with_inputs.opens, without.opens, lean.opens) == (True, False, False), (with_inputs, without)
