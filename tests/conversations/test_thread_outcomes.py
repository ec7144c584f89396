"""Support turns the scorer alone misplaces (issue 16): fixes told as what happened ("the box turned
up this afternoon"), short thanks ("Ta!"), "not fixed" said without a negation ("beeping just the
same"), and questions about the open problem in new words ("How long is the wait?")."""

from __future__ import annotations

from datetime import UTC, datetime

import numpy as np
import pytest

from agentflow.embeddings import get_embedder
from conversations.thread_detection import (
    not_fixed_yet,
    outcome_report,
    same_thread_question,
)
from conversations.thread_features import load_model
from tests.conversations.helpers import place_after

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def _embed(text: str) -> np.ndarray:
    return get_embedder().embed_one(text)


@pytest.mark.parametrize(
    "text",
    [
        "The box turned up this afternoon",
        "the refund is on my card now",
        "The fuel charge was refunded to my card this morning",
        "They found it under a blanket and dropped it off",
        "It shows under my vehicles now",
        "Notifications come through again",
        "After logging back in the Saturday slot is there",
        "The next one clicked open, I'm on my way",
        "With the large dome it sits snug and the whistle's gone",
        "Ta!",
        "cheers, sorted",
        "Lovely, ta",
        # written in a hurry (support_styles)
        "nvm a staff member at the ride had it",
        "works in chrome, she's in the lesson now",
    ],
)
def test_outcome_report_reads_fixes_told_as_what_happened(text: str) -> None:
    assert outcome_report(text)


@pytest.mark.parametrize(
    "text",
    [
        # the outcome is itself a problem, or not there yet
        "the box turned up broken",
        "It arrived this morning without the charger",
        "The refund is on my card now but only half of it",
        "still beeping",
        "it's beeping just the same",
        "The fridge is beeping again tonight",
        "The refund hasn't arrived",
        "Is it back on my card yet?",
        # another subject, a request, or the step done with no outcome told
        "Also, my other parcel arrived",
        "Can you check it arrived?",
        "I've attached it now",
        # the turns of a booking: accepting an offer is not a fix
        "That sounds great",
        "Okay thank you.",
        "Yeah, you got it.",
        "Is there any others.",
        "I am in Vancouver, BC.",
        "once again, you're right, scheduled it on 11th of march",
        "A four star hotel near the station",
        # a user coming back says hello: not an outcome (it resolved the old thread)
        "Hello again",
        "hi there!",
        "Good morning again.",
        "checked spam too nothing there",
        "nvm, it still shows the error",
    ],
)
def test_outcome_report_ignores_problems_requests_and_bookings(text: str) -> None:
    assert not outcome_report(text)


@pytest.mark.parametrize(
    ("text", "vetoed"),
    [
        ("it's beeping just the same", True),
        ("New batteries, re-paired, cold as before", True),
        ("Replaced it, no change", True),
        ("the box turned up broken", True),
        ("It arrived damaged", True),
        ("The refund is on my card now but only half of it", True),
        ("Restarting worked, but only after two tries", False),
        ("The box turned up this afternoon", False),
        # "nope" that closes ("anything else?" - "Nope, thanks") is no "not fixed"
        ("Nope, thanks so much.", False),
        ("Nope, thanks for the help!", False),
        ("nope, thanks but it still fails", True),
        # broken another way after the step: "now ..." is the scorer's fix cue, the symptom says otherwise
        ("Now the payment page shows an error", True),
        ("ok I did that, now it crashes at start", True),
        ("It gives an error now", True),
        ("Now there are no errors", False),
        ("Works now and the error is gone", False),
        ("now the page loads, thanks", False),
        # nothing came of the step, or what it was for is still bad (support_styles)
        ("checked spam too nothing there", True),
        ("No text. Nothing on email either. Same as every time", True),
        ("the invoice is still missing the address", True),
        ("the box is empty", True),
        ("Now nothing is missing, thanks", False),
        ("Thanks, no email needed, it works now", False),
        # whole words only: "less" is a cue, "lesson" is not
        ("works in chrome, she's in the lesson now", False),
        ("it's less noisy but the light still blinks", True),
    ],
)
def test_not_fixed_yet_without_a_negation(text: str, vetoed: bool) -> None:
    assert not_fixed_yet(text) is vetoed


@pytest.mark.parametrize(
    ("text", "same"),
    [
        ("who do I ring?", True),
        ("How long does the claim take?", True),
        ("Which door bell number should the engineer press downstairs?", True),
        ("Is that the thin black wire going into the hub?", True),
        ("By the way, who do I ring about my bill?", False),
        ("Can I also get assembly booked for Saturday?", False),
        ("How do I book another room as well?", False),
        ("I need a taxi to the airport", False),
    ],
)
def test_same_thread_question_is_a_question_that_opens_nothing_else(text: str, same: bool) -> None:
    assert same_thread_question(text) is same


# --- through decide_thread with the shipped model: each case below was placed otherwise before -----

PARCEL = (
    "My parcel hasn't arrived, tracking has said out for delivery since Monday.",
    "I've asked the courier to redeliver it today.",
)
REFUND = (
    "I returned the jacket two weeks ago and haven't had my money back.",
    "I've issued the refund today; it can take 3 to 5 days to show.",
)
ALARM = (
    "My smoke alarm keeps beeping every minute.",
    "Please replace the 9V battery and hold the test button for 10 seconds.",
)
DISHWASHER = (
    "My dishwasher shows error E24 and won't drain.",
    "That's the drain pump. I've booked a technician visit for Thursday.",
)
HOTEL = (
    "I need a hotel in Paris for three nights.",
    "I found Hotel Lumiere, 4 stars, 180 euros a night. Shall I book it?",
)

PLACED = [
    # fixes told as what happened, and short thanks: RESOLUTION (the scorer alone: FOLLOW_UP)
    (PARCEL, "The box turned up this afternoon", "RESOLUTION"),
    (PARCEL, "Ta!", "RESOLUTION"),
    (REFUND, "The fuel charge was refunded to my card this morning", "RESOLUTION"),
    (ALARM, "It's quiet now", "RESOLUTION"),
    # not fixed, with no negation: FOLLOW_UP (the scorer alone: RESOLUTION)
    (PARCEL, "the box turned up broken", "FOLLOW_UP"),
    (REFUND, "The refund is on my card now but only half of it", "FOLLOW_UP"),
    (ALARM, "it's beeping just the same", "FOLLOW_UP"),
    (ALARM, "Replaced it, no change", "FOLLOW_UP"),
    (DISHWASHER, "Now the display shows a different error", "FOLLOW_UP"),
    (PARCEL, "Checked the porch and the bins too, nothing there", "FOLLOW_UP"),
    (REFUND, "No email. Nothing on my statement either. Same as every time", "FOLLOW_UP"),
    (PARCEL, "nvm my neighbour had taken it in", "RESOLUTION"),
    # a question about the open problem in new words: FOLLOW_UP (before: "unrelated", NEW_TOPIC)
    (DISHWASHER, "How long is the wait for the visit at the moment?", "FOLLOW_UP"),
    (DISHWASHER, "Which door bell number should the engineer press downstairs?", "FOLLOW_UP"),
    # a closing "nope": RESOLUTION (before: vetoed as "not fixed")
    (HOTEL, "Nope, thanks so much.", "RESOLUTION"),
    # negative cases that stay as they were
    (ALARM, "still beeping", "FOLLOW_UP"),
    (ALARM, "The fridge is beeping again tonight", "FOLLOW_UP"),
    (PARCEL, "Also, can I change my delivery address?", "NEW_TOPIC"),
    (DISHWASHER, "By the way, how do I change my delivery address?", "NEW_TOPIC"),
    (HOTEL, "That sounds great", "FOLLOW_UP"),
    (HOTEL, "Yeah, you got it.", "FOLLOW_UP"),
]


@pytest.mark.parametrize(("context", "text", "expected"), PLACED)
def test_support_turns_are_placed_by_what_they_report(
    context: tuple[str, str], text: str, expected: str
) -> None:
    decision = place_after(context, text)

    assert decision.event == expected, decision.signals


def test_an_outcome_the_scorer_missed_says_the_rule_placed_it() -> None:
    decision = place_after(PARCEL, "The box turned up this afternoon")

    assert (decision.event, decision.thread_id) == ("RESOLUTION", "open")
    assert decision.signals["p_resolution"] < load_model("task").resolution.threshold
    assert (
        decision.signals["reason"] == "resolution of the active thread (an outcome reported, not the scorer)"
    )


def test_the_outcome_rule_is_for_the_task_profile_only() -> None:
    decision = place_after((PARCEL[0], ""), "The box turned up this afternoon", profile="chitchat")

    assert "outcome reported" not in decision.signals["reason"]


WIFI = (
    "My laptop won't connect to the office wifi.",
    "Please forget the network and join it again with your new password.",
)


@pytest.mark.parametrize(
    "text",
    [
        "Thanks, I'll try that.",
        "ok thanks, will give it a go tonight",
        "Cheers, I'll check and let you know",
        "thank you, trying that now",
        "Great, I'll do that after lunch and report back",
        "thx will test it tomorrow",
        "Thanks, let me try that and get back to you",
        "ok, going to try it now, thanks",
        "cheers, giving it a go now",
        "Great, going to try the reset now, thanks",
    ],
)
def test_thanks_before_trying_the_step_is_no_resolution(text: str) -> None:
    decision = place_after(WIFI, text)

    assert (decision.event, decision.thread_id) == ("FOLLOW_UP", "open"), decision.signals
    assert not outcome_report(text)


@pytest.mark.parametrize(
    "text",
    [
        "Thanks, that worked!",
        "Thanks, I'll let you know if I need anything else.",
        "That did it, thanks. I'll try printing the rest now.",
        "Thanks for the help, bye",
        "fine, I'll do that. thanks",
        # an outcome told beside the plan to try more
        "It's connecting again, I'll check the other laptop later",
        "the error's gone, I'll test it at home tonight",
        "Oh, the tape! Removed it and it prints now. I'll test the colour pages later.",
    ],
)
def test_a_fix_a_closing_or_an_accepted_plan_still_resolves(text: str) -> None:
    assert place_after(WIFI, text).event == "RESOLUTION"


def test_the_veto_says_the_customer_will_try_first() -> None:
    decision = place_after(WIFI, "Thanks, I'll try that.")

    assert decision.signals["resolution_vetoed"] == "will try it first"
