"""The chitchat profile's own cues: how open talk shifts topic, read with the process's encoder."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from agentflow.embeddings import get_embedder
from conversations.thread_detection import Candidate, decide_thread
from conversations.thread_features import (
    MODEL_PATH,
    N_CHITCHAT,
    N_HAND,
    ThreadState,
    chitchat_features,
    content_words,
    load_model,
    turn_features,
)

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
STATEMENT = "i have two cats and a collection of hats for them"
QUESTION = "do you have any pets ?"


def _embed(text: str) -> np.ndarray:
    return get_embedder().embed_one(text)


def _state(*turns: str) -> ThreadState:
    """A thread of these turns, as the pipeline keeps it: opening, last turn, running mean, words."""
    vectors = [_embed(t) for t in turns]
    state = ThreadState(
        vectors[0], vectors[-1], np.mean(vectors, axis=0), set().union(*map(content_words, turns))
    )
    state.user_turns = len(turns)
    return state


def test_chitchat_features_are_the_task_features_then_the_chat_cues() -> None:
    state = _state(STATEMENT)
    text = "what is your favorite season ? mine is winter !"

    row = chitchat_features(text, _embed(text), state)

    assert row.shape == (N_HAND + 384 + N_CHITCHAT,)
    assert np.array_equal(row[: N_HAND + 384], turn_features(text, _embed(text), state))


@pytest.mark.parametrize(
    ("previous", "text", "asks_after_statement", "cues"),
    [
        # a question about the partner after a statement: how chit-chat opens a topic
        (STATEMENT, "what is your favorite season ? mine is winter !", True, {3: 1, 6: 1, 2: 0}),
        (STATEMENT, "have you ever watched the olympics ?", True, {3: 1, 6: 1, 2: 0}),
        # picking up the last turn: a pointer or a reaction first
        (STATEMENT, "that is a lot lol", False, {2: 1, 3: 0, 6: 0}),
        (STATEMENT, "wow ! ! that is a lot of hats", False, {2: 1, 3: 0}),
        # an answer to a question, about oneself, asking back
        (QUESTION, "i have a dog named max , and you ?", False, {4: 1, 5: 1, 2: 0}),
        (QUESTION, "my dog is a beagle", False, {4: 0, 5: 1, 2: 0}),
    ],
)
def test_chat_cues(previous: str, text: str, asks_after_statement: bool, cues: dict[int, int]) -> None:
    row = chitchat_features(text, _embed(text), _state(previous))
    chat = row[N_HAND + 384 :]

    # [0]: a question after a statement (the previous turn read by the question probe, a probability)
    assert bool(chat[0] > 0.5) is asks_after_statement, chat.tolist()
    for index, value in cues.items():
        assert chat[index] == value, (text, index, chat.tolist())


def test_the_question_probe_tells_an_answer_from_a_new_question() -> None:
    after_question = chitchat_features("my dog is a beagle", _embed("my dog is a beagle"), _state(QUESTION))
    after_statement = chitchat_features("my dog is a beagle", _embed("my dog is a beagle"), _state(STATEMENT))

    # [1]: a statement after a question (an answer), which rarely opens a topic
    assert after_question[N_HAND + 384 + 1] > 0.5 > after_statement[N_HAND + 384 + 1]


def test_only_the_chitchat_profile_reads_the_chat_cues() -> None:
    task, chat = load_model("task"), load_model("chitchat")

    assert (task.feature_set, chat.feature_set) == ("task", "chitchat")
    assert chat.new_topic.weights.shape == (N_HAND + 384 + N_CHITCHAT,)
    assert task.new_topic.weights.shape[0] in (N_HAND, N_HAND + 384)
    # the chitchat profile's resolution scorer is the task one, reading the task features only
    assert np.array_equal(chat.resolution.weights, task.resolution.weights)
    state = _state(STATEMENT)
    text = "what is your favorite season ?"
    assert task.features(text, _embed(text), state).shape == (N_HAND + 384,)


def test_a_model_file_naming_unknown_features_is_refused(tmp_path) -> None:
    data = json.loads(MODEL_PATH.read_text())
    data["profiles"]["chitchat"]["features"] = "gossip"
    path = tmp_path / "thread_model.json"
    path.write_text(json.dumps(data))

    with pytest.raises(ValueError, match="unknown features 'gossip'"):
        load_model("chitchat", str(path))


@pytest.mark.parametrize(
    ("turns", "text", "event"),
    [
        (
            (STATEMENT, "wow that is a lot of hats"),
            "what is your favorite season ? mine is winter !",
            "NEW_TOPIC",
        ),
        ((STATEMENT, "do you have a favorite one ?"), "yes , the red one with the feather", "FOLLOW_UP"),
    ],
)
def test_chitchat_decisions(turns: tuple[str, ...], text: str, event: str) -> None:
    decision = decide_thread(
        text=text,
        embedding=_embed(text),
        candidates=[Candidate("chat", _state(*turns), NOW - timedelta(seconds=20))],
        now=NOW,
        inactivity=timedelta(minutes=30),
        model=load_model("chitchat"),
    )

    assert decision.event == event, decision.signals
