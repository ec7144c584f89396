"""Topic shifts the scorer alone misplaces (issue 16): another request announced by its opening ("One
more: ...", "Now find me ..."), a new request right after the assistant finished the last one, and the
reverse, an answer to the assistant's own question ("Where are you flying from?" -> "From Manchester")
that the scorer took for a new subject."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from agentflow.embeddings import get_embedder
from conversations.thread_detection import (
    Candidate,
    answers_slot_question,
    decide_thread,
    new_request_after_done,
    opens_another_request,
)
from conversations.thread_features import ThreadState, content_words, load_model
from tests.conversations.helpers import place_after

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def _embed(text: str) -> np.ndarray:
    return get_embedder().embed_one(text)


@pytest.mark.parametrize(
    ("text", "novelty", "opens"),
    [
        ("One more: do you ship to Norway?", 1.0, True),
        ("Thanks. One more question - can I pay in instalments?", 1.0, True),
        ("Now find me a cheap hotel near the stadium", 1.0, True),
        ("OK, now could you check the balance of my savings account?", 0.8, True),
        # a report that starts with "now", a request about the open subject, a known subject
        ("Now I hear people but they can't hear me", 0.5, False),
        ("Now can you reset it for me?", 1.0, False),
        ("Now find me the invoice for the lamp order", 0.2, False),
        ("Can I also pay by card for that order?", 1.0, False),
    ],
)
def test_opens_another_request(text: str, novelty: float, opens: bool) -> None:
    assert opens_another_request(text, novelty) is opens


@pytest.mark.parametrize(
    ("text", "assistant", "done"),
    [
        ("Please find me a taxi to get there", "Your table at Trattoria Roma is booked for 8 pm.", True),
        ("Show me some museums nearby", "Your transfer has been initiated.", True),
        # about what was done, or the assistant has not finished
        ("What's the address?", "Your table at Trattoria Roma is booked for 8 pm.", False),
        ("Can you send me the confirmation by email?", "Your room is booked.", False),
        ("Please find me a taxi to get there", "Shall I book the table for 8 pm?", False),
        ("Please find me a taxi to get there", "I found Trattoria Roma, 4.5 stars.", False),
    ],
)
def test_new_request_after_done(text: str, assistant: str, done: bool) -> None:
    assert new_request_after_done(text, assistant) is done


@pytest.mark.parametrize(
    ("text", "assistant", "answers"),
    [
        ("I'm leaving from Manchester with two bags", "Sure. Where will you be flying from?", True),
        ("Porto, for four nights", "Which city should I search in?", True),
        # an invitation to another subject, a shift said outright, a refusal, a question back
        ("I want to listen to some music", "Is there anything else I can help with?", False),
        ("I want to listen to some music", "What else would you like?", False),
        ("Manchester. I also need a hotel there", "Where will you be flying from?", False),
        ("No, but could you find me a bus instead", "Which day would you like to travel?", False),
        ("Which airports are there?", "Where will you be flying from?", False),
        ("Manchester", "I found a flight at 9 am for 120 euros.", False),
    ],
)
def test_answers_slot_question(text: str, assistant: str, answers: bool) -> None:
    assert answers_slot_question(text, assistant) is answers


# --- through decide_thread with the shipped model: the first cases were placed otherwise before -----

SHOP = (
    "I ordered a desk lamp last week, order 5521, and I want to pay for it.",
    "You can pay by bank transfer within 14 days.",
)
PARCEL = (
    "My parcel to my sister never arrived, the tracking stopped in Leeds.",
    "Could you check with your neighbours? I'll open a trace if not.",
)
TABLE = (
    "Book me a table for two at an Italian restaurant tonight.",
    "Done: your table at Trattoria Roma is booked for 8 pm.",
)
FLIGHT = (
    "I need a flight to Lisbon next Friday.",
    "Sure. Where will you be flying from?",
)

PLACED = [
    # another request announced by how the message opens: NEW_TOPIC (before: FOLLOW_UP)
    (SHOP, "One more: do you deliver to Norway?", "NEW_TOPIC"),
    (PARCEL, "Now find me the cheapest way to send a parcel to Spain", "NEW_TOPIC"),
    # a new request after the assistant finished the last one: NEW_TOPIC (before: FOLLOW_UP)
    (TABLE, "Show me some museums nearby", "NEW_TOPIC"),
    (TABLE, "Okay, please get me a ride to the restaurant.", "NEW_TOPIC"),
    # an answer to the assistant's question: FOLLOW_UP (before: NEW_TOPIC)
    (FLIGHT, "I'd like to see if there are business class seats from Atlanta", "FOLLOW_UP"),
    # negative cases that stay as they were
    (SHOP, "Can I also pay by card for that order?", "FOLLOW_UP"),
    (SHOP, "Now can you send me the bank details for it?", "FOLLOW_UP"),
    (TABLE, "How much does it cost per person?", "FOLLOW_UP"),
    (FLIGHT, "I'm leaving from Manchester with two bags", "FOLLOW_UP"),
    (FLIGHT, "By the way, how do I change my seat on another booking?", "NEW_TOPIC"),
]


@pytest.mark.parametrize(("context", "text", "expected"), PLACED)
def test_topic_shifts_are_placed_by_how_the_request_opens(
    context: tuple[str, str], text: str, expected: str
) -> None:
    decision = place_after(context, text)

    assert decision.event == expected, decision.signals


def test_the_shift_rules_say_they_placed_the_message_and_are_for_the_task_profile_only() -> None:
    problem, reply = PARCEL
    vector = _embed(problem)
    text = "Now find me the cheapest way to send a parcel to Spain"
    decisions = {}
    for profile in ("task", "chitchat"):
        state = ThreadState(
            vector, vector, vector.copy(), content_words(problem) | content_words(reply), reply
        )
        decisions[profile] = decide_thread(
            text=text,
            embedding=_embed(text),
            candidates=[Candidate("parcel", state, NOW - timedelta(minutes=1))],
            now=NOW,
            inactivity=timedelta(minutes=30),
            model=load_model(profile),
        )

    assert decisions["task"].event == "NEW_TOPIC"
    assert decisions["task"].signals["p_new_topic"] < load_model("task").new_topic.threshold
    assert decisions["task"].signals["reason"] == "opens another request (not the scorer)"
    assert "not the scorer" not in decisions["chitchat"].signals["reason"]
