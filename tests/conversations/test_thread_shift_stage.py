"""The second stage for unmarked topic shifts (issue 16): a message the scorer continued that opens a
subject of its own with no marker ("Do you do beard trims?" after a refund for a haircut) opens a thread;
the message of the same form that leans on the thread ("Is there a cancellation fee?" after a
cancellation) stays, and so does a question for a detail of what the thread found ("What's the cost per
night?"). Through the agent and the real database, as ``Agent.detect_thread`` places messages; cases
from the tuning support chats (bench/train_shift_stage.py)."""

from __future__ import annotations

import json
from collections.abc import Callable

import numpy as np
import pytest

from agentflow import AgentFrameworkBuilder
from conversations import thread_detection
from conversations.models import Message, Thread
from conversations.thread_detection import reply_tail, shift_stage, stage_opens_subject
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
        "When will it show on my card?",
        _vector("When will it show on my card?"),
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

    assert shift[0] is True and shift[1] is not None and shift[1] >= shift_stage().threshold
    assert leaning[0] is False and leaning[1] is not None and leaning[1] < shift_stage().threshold
    assert detail == off == no_reply == (False, None)  # a detail of what was found; no encoder; no reply
    assert asked == ["I've refunded the duplicate £35."] * 2


def test_a_stage_file_fitted_on_other_features_is_refused(tmp_path, monkeypatch) -> None:
    data = json.loads(thread_detection.SHIFT_STAGE_PATH.read_text())
    data["features"] = data["features"][:-1]
    path = tmp_path / "shift_stage.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(thread_detection, "SHIFT_STAGE_PATH", path)
    monkeypatch.setattr(thread_detection, "_shift_stage", None)

    with pytest.raises(ValueError, match="other features"):
        shift_stage()


@pytest.mark.parametrize("words", [None, 0, "24"])
def test_a_stage_file_without_a_reply_length_is_refused(tmp_path, monkeypatch, words) -> None:
    data = json.loads(thread_detection.SHIFT_STAGE_PATH.read_text())
    if words is None:
        del data["reply_words"]
    else:
        data["reply_words"] = words
    path = tmp_path / "shift_stage.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(thread_detection, "SHIFT_STAGE_PATH", path)
    monkeypatch.setattr(thread_detection, "_shift_stage", None)

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
    opens, p = stage_opens_subject(message, _vector(message), state, 0.05, embed)
    blank, _ = _state("I stopped getting notifications after the update.", " \n ")
    skipped = stage_opens_subject(message, _vector(message), blank, 0.05, embed)

    assert len(long_reply.split()) > 150
    assert asked == [reply_tail(long_reply, shift_stage().reply_words)]
    assert asked[0].endswith("I can check?") and len(asked[0].split()) <= shift_stage().reply_words
    assert p is not None and opens == (p >= shift_stage().threshold)
    assert skipped == (False, None)  # a reply of blanks is no reply: nothing embedded
