"""Support chats as customers write them (issue 16): a question of its own about another subject with no
marker ("Does your app work on Linux?" while a crash is the thread, also given in place of an answer to
the assistant's question), a resolution told by what the step did ("Flicking airplane mode gave me full
bars"), the step done and what it left ("Pressed the keys, the screen went black again"), and a question
back in place of an outcome. Each shift or resolution stands beside the message of the same form that
leans on the thread or tells that nothing is fixed yet. Cases from the tuning part of
bench/data/support_unmarked2.jsonl and new ones of the same forms."""

from __future__ import annotations

import pytest

from conversations.thread_detection import asks_back, asks_own_question, step_did_it, step_left_problem
from conversations.thread_features import content_words, load_model
from tests.conversations.helpers import place_after

FAN = (
    "My laptop fan runs loud all the time even when idle.",
    "Open Task Manager and check whether a process is using a lot of CPU.",
)
VERSION = ("The photo editor crashes when I export to PNG.", "Which version of the editor are you running?")
BULB = ("My smart bulb won't respond to the app.", "Turn the bulb off and on five times to reset it.")
DATA = ("My data stopped working after I topped up.", "Restart the phone so it picks up the new allowance.")
PARCEL = (
    "My parcel says delivered but it isn't here.",
    "Could you check with your neighbours and your safe place first?",
)
SIGNAL = ("I have no signal since this morning.", "Switch airplane mode on and off.")
SCREEN = (
    "My laptop's screen stays black after login.",
    "Press Win+Ctrl+Shift+B to reset the graphics driver.",
)
ROUTER = (
    "The router's red light is on.",
    "A red light means no line signal. Check the grey cable into the DSL port.",
)

PAIRS = [
    # a question of its own about another subject, and one of the same form that leans on the thread
    (FAN, "Does the Zenbook 14 come in a 32 GB version?", "NEW_TOPIC"),
    (FAN, "Does the fan noise mean it is overheating?", "FOLLOW_UP"),
    (BULB, "Does your doorbell camera need a subscription?", "NEW_TOPIC"),
    (BULB, "Does it blink once it's reset?", "FOLLOW_UP"),
    (DATA, "What if restarting doesn't do it?", "FOLLOW_UP"),
    (PARCEL, "Can I change the delivery address of my other order?", "NEW_TOPIC"),
    # in place of an answer to the assistant's question, and the answer
    (VERSION, "Does your app work on Linux?", "NEW_TOPIC"),
    (VERSION, "Version 4.2, I think, the one from last month.", "FOLLOW_UP"),
    # a resolution told by what the step did, and the same step that left the problem
    (SIGNAL, "Flicking airplane mode gave me full bars.", "RESOLUTION"),
    (SIGNAL, "Tried airplane mode twice, no bars.", "FOLLOW_UP"),
    (SCREEN, "The key combo brought the screen back.", "RESOLUTION"),
    (SCREEN, "Pressed the keys, the screen flickered and went black again.", "FOLLOW_UP"),
    # a question back, no outcome told
    (ROUTER, "My cable looks fine, is that the one with the green clip?", "FOLLOW_UP"),
]


@pytest.mark.parametrize(("context", "text", "expected"), PAIRS)
def test_unmarked_shifts_and_outcomes_against_the_same_form_leaning_on_the_thread(
    context: tuple[str, str], text: str, expected: str
) -> None:
    decision = place_after(context, text)

    assert decision.event == expected, decision.signals


@pytest.mark.parametrize(
    ("text", "vocabulary", "similarity", "expected"),
    [
        ("Does the Zenbook 14 come in a 32 GB version?", {"fan", "loud", "idle"}, 0.2, True),
        ("Is the Pixel 8 compatible with my carrier?", {"callers", "earpiece"}, 0.2, True),
        ("How much is the TV add-on per month?", {"desktop", "slow", "wifi"}, 0.1, True),
        ("Can I change the delivery address of my other order?", {"parcel", "delivery"}, 0.5, True),
        # close to the thread, or in its words
        ("Does the Zenbook 14 come in a 32 GB version?", {"fan", "loud", "idle"}, 0.4, False),
        ("How long does the credit last?", {"order", "cold", "credit"}, 0.1, False),
        # leans on the thread: a pronoun, "there", "then", "as well"
        ("Does it blink once it's reset?", {"bulb", "app"}, 0.1, False),
        ("Is there a student discount?", {"payment", "card"}, 0.1, False),
        ("Can I buy a single extra class then?", {"spin", "class"}, 0.1, False),
        # the subject is a person or the process: what happens next in the thread's own matter
        ("Do I keep my old number?", {"sim", "activated"}, 0.1, False),
        ("Will our car space be kept?", {"ferry", "cancelled"}, 0.1, False),
        ("What happens if I miss the deadline?", {"essay", "upload"}, 0.1, False),
        ("How long does the transfer take?", {"payment", "germany"}, 0.1, False),
        # a detail of what the thread found (SGD dev: "What's the cost per night?", "Is the entry here
        # free?", "Do you have anything starring ...?", "which is the arrival station?")
        ("What is the total cost?", {"hotel", "booking"}, 0.1, False),
        ("What's the cost per night?", {"rooms", "booked"}, 0.1, False),
        ("Is the entry here free?", {"landmark", "historical"}, 0.1, False),
        ("Do you have anything starring Dimiter Marinov?", {"movie", "biographical"}, 0.1, False),
        ("Which is the arrival station?", {"buses", "transfers"}, 0.1, False),
    ],
)
def test_asks_own_question(text: str, vocabulary: set[str], similarity: float, expected: bool) -> None:
    assert asks_own_question(text, content_words(text), vocabulary, similarity) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Flicking airplane mode gave me full bars.", True),
        ("Picking the right class made them all appear.", True),
        ("The reset brought it back.", True),
        ("Unplugging the router brought the internet back.", True),
        # the step made it worse, made no difference, or the customer will try it first
        ("Restarting made it worse.", False),
        ("Unplugging the router made no difference.", False),
        ("The update gave me an error on start.", False),
        ("The reset brought it back, but the sound is still off.", False),
        ("Flicking airplane mode gave me full bars?", False),
    ],
)
def test_step_did_it(text: str, expected: bool) -> None:
    assert step_did_it(text) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Pressed the keys, the screen flickered and went black again.", True),
        ("Wiped both, it reaches the dock and backs off again.", True),
        ("Did both, it cut out twice on the way home.", True),
        # a restoration, a symptom denied or gone, a state that holds now
        ("Restarted it and it's connecting again.", False),
        ("Pushed it back in and I'm riding with assist again", False),
        ("Updated it, no crashes since.", False),
        ("Cleaned it, the noise stopped.", False),
        ("Levelled it hot and the first layer stays down now", False),
    ],
)
def test_step_left_problem(text: str, expected: bool) -> None:
    assert step_left_problem(text) is expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("My cable looks fine, is that the one with the green clip?", True),
        ("Which of the ports is the DSL one?", True),
        # thanks, a fix or an outcome before the question
        ("Thanks, that fixed it! Will the charge disappear?", False),
        ("The light is green now, do I need to restart the box?", False),
        ("The cable looks fine.", False),
        ("Great, you're a real pip you know it?", False),
    ],
)
def test_asks_back(text: str, expected: bool) -> None:
    assert asks_back(text) is expected


def test_the_new_rules_say_they_placed_the_message_and_are_for_the_task_profile_only() -> None:
    task = place_after(FAN, "Does the Zenbook 14 come in a 32 GB version?")
    chitchat = place_after(FAN, "Does the Zenbook 14 come in a 32 GB version?", profile="chitchat")
    in_place = place_after(VERSION, "Does your app work on Linux?")
    step = place_after(SIGNAL, "Flicking airplane mode gave me full bars.")
    back = place_after(ROUTER, "My cable looks fine, is that the one with the green clip?")

    assert task.signals["p_new_topic"] < load_model("task").new_topic.threshold
    assert task.signals["reason"] == "a question of its own about another subject (not the scorer)"
    assert "not the scorer" not in chitchat.signals["reason"]
    assert in_place.signals["reason"] == (
        "a question of its own in place of an answer to the assistant's (not the scorer)"
    )
    assert step.signals["reason"] == "resolution of the active thread (an outcome reported, not the scorer)"
    assert back.signals["resolution_vetoed"] == "asks something back"
