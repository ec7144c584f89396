"""Returns to an earlier thread: every way a message is found new for the active thread looks at the
earlier ones, and a "still not done" message closer to an earlier open thread goes back to it."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from agentflow.embeddings import get_embedder
from conversations.thread_detection import (
    RETURN_OVER_ACTIVE,
    STATUS_RETURN_SIMILARITY,
    Candidate,
    decide_thread,
    not_fixed_yet,
    still_waiting,
)
from conversations.thread_features import ThreadState, content_words, load_model

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
INACTIVITY = timedelta(minutes=30)


def _embed(text: str) -> np.ndarray:
    return get_embedder().embed_one(text)


def _thread(name: str, text: str, reply: str = "", idle_minutes: float = 1) -> Candidate:
    vector = _embed(text)
    state = ThreadState(vector, vector, vector.copy(), content_words(text), last_assistant_text=reply)
    return Candidate(name, state, NOW - timedelta(minutes=idle_minutes))


def _decide(text: str, *candidates: Candidate):
    return decide_thread(
        text=text,
        embedding=_embed(text),
        candidates=candidates,
        now=NOW,
        inactivity=INACTIVITY,
        model=load_model("task"),
        embed_reply=get_embedder().embed_one,
    )


def _cos(a: str, b: str) -> float:
    return float(_embed(a) @ _embed(b))


IMAGES = "the images on my homepage load really slow"
FOOTER = "how do i add a facebook link in the footer"
FOOTER_REPLY = "Go to Footer settings, choose Social links and paste your Facebook page address."


def test_a_message_unrelated_to_the_active_thread_goes_back_to_the_earlier_one_it_is_about() -> None:
    text = "pressed optimise images and the homepage is just as slow as before"
    # Found unrelated to the active thread (not by the scorer's new-topic verdict), and close to the
    # earlier one: before, the "unrelated" verdict opened a third thread without looking back.
    decision = _decide(
        text, _thread("footer", FOOTER, FOOTER_REPLY), _thread("images", IMAGES, idle_minutes=3)
    )

    assert (decision.event, decision.thread_id) == ("RETURN", "images")
    assert decision.signals["reason"] == "unrelated to the active thread; close to an earlier thread"


def test_an_unrelated_message_close_to_no_earlier_thread_opens_a_new_one() -> None:
    text = "I was charged twice for my annual plan this month"
    decision = _decide(
        text, _thread("footer", FOOTER, FOOTER_REPLY), _thread("images", IMAGES, idle_minutes=3)
    )

    assert (decision.event, decision.thread_id) == ("NEW_TOPIC", None)


SUITCASE = "I need to return the black case you sent and get the navy one I ordered"
SCALES = "Thank you. Also, do you sell those little luggage scales that hang from the handle?"
SCALES_REPLY = "Yes, our digital luggage scale is 12.99 and weighs bags up to 50 kg."
NAVY_LATE = "Got the return label but the navy case hasn't arrived yet and we fly on Saturday morning."


def test_a_still_waiting_message_about_an_earlier_open_thread_goes_back_to_it() -> None:
    active, earlier = _thread("scales", SCALES, SCALES_REPLY), _thread("suitcase", SUITCASE, idle_minutes=4)
    to_earlier, to_active = _cos(NAVY_LATE, SUITCASE), _cos(NAVY_LATE, SCALES)
    assert to_earlier >= STATUS_RETURN_SIMILARITY and to_earlier - to_active >= RETURN_OVER_ACTIVE

    decision = _decide(NAVY_LATE, active, earlier)

    assert (decision.event, decision.thread_id) == ("RETURN", "suitcase")
    assert decision.signals["reason"] == "closer to an earlier open thread than to the active one"


def test_the_same_closeness_without_a_still_waiting_message_stays_with_the_active_thread() -> None:
    # As close to the suitcase thread, but asking about the scale: nothing says a matter is not done.
    text = "Does the scale also work for the navy suitcase?"
    assert not still_waiting(text)

    decision = _decide(
        text, _thread("scales", SCALES, SCALES_REPLY), _thread("suitcase", SUITCASE, idle_minutes=4)
    )

    assert decision.thread_id == "scales"


def test_a_resolved_earlier_thread_is_not_taken_back_by_a_still_waiting_message() -> None:
    suitcase = _thread("suitcase", SUITCASE, idle_minutes=4)
    resolved = Candidate(suitcase.thread_id, suitcase.state, suitcase.last_activity_at, resolved=True)

    decision = _decide(NAVY_LATE, _thread("scales", SCALES, SCALES_REPLY), resolved)

    assert decision.thread_id != "suitcase"


@pytest.mark.parametrize(
    ("text", "waiting"),
    [
        ("The 46 mm strap hasn't arrived, and there was no return label in my email either", True),
        ("The mechanic hasn't turned up at Hillside and it's gone 11", True),
        ("Nobody has come about the pellets yet", True),
        ("the parcel hasnt arrived", True),
        ("any news on the blue backpack", True),
        ("still no new bag its been 4 days", True),
        ("Thanks, it has arrived", False),
        ("It has come through now, thanks", False),
        ("Is there parking at the Riverside cinema?", False),
    ],
)
def test_still_waiting_reads_what_has_not_come_and_asks_for_news(text: str, waiting: bool) -> None:
    assert still_waiting(text) is waiting


def test_what_has_not_arrived_is_no_fix_though_arrived_is_a_fix_word() -> None:
    assert not_fixed_yet("The 46 mm strap hasn't arrived, and there was no return label in my email either")
    assert not not_fixed_yet("The new strap arrived this morning, thanks")
