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
    adds_another_request,
    adds_to_thread,
    answers_not_outcome,
    answers_slot_question,
    decide_thread,
    names_own_subject,
    new_request_after_done,
    new_subject_after_resolution,
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


# --- what an additive marker adds ("Also, ...", "Oh and ...", "... too"): another request, or more of the
# same subject. Cases from the support chats' tuning part (bench/data/support_turns.jsonl). ---------------

CLAIM = (
    "I need to make a claim for my cracked windscreen.",
    "A glass partner will call you within one working day.",
)
CHARGE = (
    "I was charged twice for my March subscription.",
    "I can see two charges. I've refunded the duplicate; it takes 3-5 days.",
)
ROUTER = (
    "My router has had no internet since the storm.",
    "Please unplug it for 30 seconds and plug it back in.",
)
LOST_CARD = ("I lost my debit card on the bus.", "A new card will arrive in 3-5 working days.")
CUSTOMS = (
    "My parcel to Germany has been stuck in customs for a week.",
    "It's waiting for the recipient to pay import VAT. They should get a letter.",
)
DISPUTE = (
    "I want to dispute a charge from a gym I cancelled.",
    "I've opened dispute D-2231. We'll update you within 10 days.",
)


def _vocabulary(context: tuple[str, str]) -> set[str]:
    return content_words(context[0]) | content_words(context[1])


@pytest.mark.parametrize(
    ("context", "text", "another"),
    [
        (CLAIM, "Can you also tell me when my home insurance renews?", True),
        (CHARGE, "Please also send me the invoices for January and February.", True),
        (DISPUTE, "I also need a new PIN, I forgot mine.", True),
        (ROUTER, "Oh and can I upgrade to the 500 Mb package?", True),
        (CUSTOMS, "Oh and can I change the address on my other parcel to my office?", True),  # another one
        # points back at the thread's thing, names it, asks a detail of it, or has no additive marker
        (CUSTOMS, "Can you also check whether it's insured for the full value?", False),
        (CHARGE, "Also, will the refund go back to the same card?", False),
        (CHARGE, "Can you also tell me which charge you refunded?", False),
        (LOST_CARD, "And can I still pay with my phone until then?", False),
        (CUSTOMS, "And what is the customs office's phone number?", False),
        (CLAIM, "Can you tell me when my home insurance renews?", False),
    ],
)
def test_adds_another_request(context: tuple[str, str], text: str, another: bool) -> None:
    assert adds_another_request(text, content_words(text), _vocabulary(context)) is another


@pytest.mark.parametrize(
    ("context", "text", "same"),
    [
        (ROUTER, "Also, the light is blinking orange now", True),  # a report, no request
        (CHARGE, "Also, will the refund go back to the same card?", True),
        (LOST_CARD, "And can I still pay with my phone until then?", True),
        (CUSTOMS, "Can you also check whether it's insured for the full value?", True),
        (CUSTOMS, "Also, he says his bank needs a SWIFT code from us", True),
        # another subject said outright, another thing of the kind, a new request naming the last one's place
        (CUSTOMS, "By the way, is it cheaper to send it by sea?", False),
        (CUSTOMS, "Also, my other parcel to Spain was returned to me", False),
        (CUSTOMS, "Thanks. I also need a hotel there for two nights.", False),
        (CLAIM, "Can you also tell me when my home insurance renews?", False),
        (ROUTER, "The light is blinking orange now", False),  # no additive marker: the scorer decides
        # a symptom word alone is no tie; a new request's own "it" comes after what it names
        (ROUTER, "Also, I was charged twice for my TV package this month.", False),
        (ROUTER, "Can you also get me a new phone? I want to pick it up in a shop.", False),
        (ROUTER, "And how do I set up voicemail on it?", False),
    ],
)
def test_adds_to_thread(context: tuple[str, str], text: str, same: bool) -> None:
    assert adds_to_thread(text, content_words(text), _vocabulary(context)) is same


@pytest.mark.parametrize(
    ("text", "assistant", "answer"),
    [
        (
            "It was half out, I pushed it in",
            "Orange means no network. Is the grey cable in the DSL port?",
            True,
        ),
        ("It's unlocked", "It can if it's carrier-locked. Is it unlocked?", True),
        ("Yes, it says 'unable to complete'", "Did you scan the QR code from the welcome email?", True),
        ("Do you need the whole file or just the surgery notes?", "Could you upload the vet's notes?", True),
        ("It's QX7P2L", "Please send me the booking reference.", True),
        # an outcome told anyway, a question about the outcome, an offer declined, no question asked
        ("Topped it up to 1.5, the radiators are warming up", "Can you top it up to 1.5 bar?", False),
        ("It was set to the US, changing it to the UK fixed the currency.", "Is it set to the US?", False),
        ("Did one chip and PIN payment and now contactless works", "Have you used chip and PIN yet?", False),
        ("Yes", "Does it work now?", False),
        ("No, that's all I need.", "Do you want to purchase tickets now?", False),
        ("It's unlocked", "I've unlocked your account.", False),
    ],
)
def test_answers_not_outcome(text: str, assistant: str, answer: bool) -> None:
    assert answers_not_outcome(text, assistant) is answer


@pytest.mark.parametrize(
    ("text", "novelty", "similarity", "new"),
    [
        ("Do you deliver to the Northside area?", 1.0, 0.15, True),
        ("Can I watch the football channel on my phone?", 1.0, 0.15, True),
        ("My controller won't pair with the console.", 1.0, 0.10, True),
        # points back, shares the thread's words or is close to it, a thanks, a short decline
        ("Will it show on my statement?", 1.0, 0.15, False),
        ("How long does the refund take?", 0.5, 0.15, False),
        ("Do you deliver to the Northside area?", 1.0, 0.40, False),
        ("Thanks again, bye", 1.0, 0.05, False),
        ("No, maybe later though.", 1.0, 0.05, False),
    ],
)
def test_new_subject_after_resolution(text: str, novelty: float, similarity: float, new: bool) -> None:
    assert new_subject_after_resolution(text, content_words(text), novelty, similarity) is new


CARTRIDGE = (
    "The new ink cartridge isn't recognised.",
    "Please remove the orange tape from the cartridge and put it back in.",
)
THERMOSTAT = (
    "My smart thermostat shows 'no heat' even though the boiler is on.",
    "Please check the wiring: is the W1 wire firmly in its terminal?",
)
ESIM = ("My new phone won't activate the eSIM.", "It can if it's carrier-locked. Is it unlocked?")
JAM = (
    "My printer keeps jamming on the second page of every job.",
    "Please take out the tray and look for torn paper behind it. Is anything stuck there?",
)

ADDED = [
    # what was placed otherwise before these rules (the scorer or an older rule), from the tuning chats
    (CLAIM, "Also, will the glass partner come to my house?", "FOLLOW_UP"),
    (CHARGE, "Also, will the refund go back to the same card?", "FOLLOW_UP"),
    (CHARGE, "Please also send me the invoices for January and February.", "NEW_TOPIC"),
    (ROUTER, "Also, the light is blinking orange now", "FOLLOW_UP"),
    (LOST_CARD, "And can I still pay with my phone until then?", "FOLLOW_UP"),
    (CUSTOMS, "Can you also check whether it's insured for the full value?", "FOLLOW_UP"),
    (DISPUTE, "I also need a new PIN, I forgot mine.", "NEW_TOPIC"),
    (THERMOSTAT, "It was a bit loose, I pushed it back in", "FOLLOW_UP"),
    (ESIM, "It's unlocked", "FOLLOW_UP"),
    (JAM, "Yes, there was a small piece wedged at the back", "FOLLOW_UP"),
    # placed right before and after
    (ROUTER, "Oh and do you sell mesh extenders?", "NEW_TOPIC"),
    (LOST_CARD, "And how do I set up a savings goal?", "NEW_TOPIC"),
    (CUSTOMS, "Oh and my friend says she never got the letter", "FOLLOW_UP"),
    (CARTRIDGE, "Cleaning the contacts worked", "RESOLUTION"),
]


@pytest.mark.parametrize(("context", "text", "expected"), ADDED)
def test_what_an_additive_message_adds_decides_its_thread(
    context: tuple[str, str], text: str, expected: str
) -> None:
    decision = place_after(context, text)

    assert decision.event == expected, decision.signals


def _place(text: str, threads: list[tuple[str, tuple[str, str], bool]]) -> object:
    """``decide_thread`` with these threads (id, (problem, assistant's reply), resolved), the first one
    the active thread (a minute old), the others older."""
    candidates = []
    for minutes, (thread_id, (problem, reply), resolved) in enumerate(threads, start=1):
        vector = _embed(problem)
        state = ThreadState(
            vector, vector, vector.copy(), content_words(problem) | content_words(reply), reply
        )
        candidates.append(Candidate(thread_id, state, NOW - timedelta(minutes=minutes), resolved=resolved))
    return decide_thread(
        text=text,
        embedding=_embed(text),
        candidates=candidates,
        now=NOW,
        inactivity=timedelta(minutes=30),
        model=load_model("task"),
    )


@pytest.mark.parametrize(
    ("resolved", "text", "expected"),
    [
        (
            ("food", ("My order arrived without the drinks.", "Anything else?"), True),
            "Do you deliver to the Northside area?",
            "NEW_TOPIC",
        ),
        (
            ("box", ("My TV box freezes every few minutes.", "Great!"), True),
            "Can I watch the football channel on my phone?",
            "NEW_TOPIC",
        ),
        (
            ("games", ("My son bought games on my account without asking.", "Anything else?"), True),
            "My controller won't pair with the console.",
            "NEW_TOPIC",
        ),
        # the problem of the resolved thread again, a last thanks: not another subject
        (
            ("box", ("My TV box freezes every few minutes.", "Great!"), True),
            "It froze again just now",
            "FOLLOW_UP",
        ),
        (
            ("food", ("My order arrived without the drinks.", "Anything else?"), True),
            "Thanks again, bye",
            "RESOLUTION",
        ),
    ],
)
def test_another_subject_right_after_a_resolution_opens_a_thread(
    resolved: tuple[str, tuple[str, str], bool], text: str, expected: str
) -> None:
    decision = _place(text, [resolved])

    assert decision.event == expected, decision.signals


def test_back_to_names_the_earlier_thread_by_its_words() -> None:
    """ "Back to the toner, ...": the earlier thread whose words it uses, though its topic embedding is
    far from the question (before: FOLLOW_UP in the active thread)."""
    invoice = (
        "Do you have an invoice for my last order? I need it for expenses.",
        "I've emailed the invoice.",
    )
    toner = ("My laser printer prints faint grey text.", "Then it's time for a new toner cartridge.")

    decision = _place(
        "Back to the toner, which cartridge fits the M234?",
        [("invoice", invoice, False), ("toner", toner, False)],
    )

    assert (decision.event, decision.thread_id) == ("RETURN", "toner"), decision.signals
    assert decision.signals["reason"] == "return cue naming an earlier thread's subject"


def test_the_additive_rules_say_they_placed_the_message_and_are_for_the_task_profile_only() -> None:
    reasons = {
        profile: place_after(CHARGE, text, profile=profile).signals["reason"]
        for profile in ("task", "chitchat")
        for text in ["Also, will the refund go back to the same card?"]
    }
    asks = place_after(CHARGE, "Please also send me the invoices for January and February.")

    assert reasons["task"] == "adds to the active thread (not the scorer)"
    assert "not the scorer" not in reasons["chitchat"]
    assert asks.signals["reason"] == "asks for something else as well (not the scorer)"
    vetoed = place_after(DISPUTE, "I also need a new PIN, I forgot mine.")
    assert vetoed.signals["resolution_vetoed"] == "asks for something else"
    assert vetoed.signals["p_resolution"] >= load_model("task").resolution.threshold


# --- a bare new subject mid-thread, with no marker, against a new detail of the same problem that leans
# on the thread. Cases from the support chats' tuning part (bench/data/support_turns.jsonl, "-u" chats):
# the shifts were FOLLOW_UP before; the follow-ups stay FOLLOW_UP. -----------------------------------

BARE = [
    (
        (
            "I ordered a lamp last week and the tracking hasn't moved since Monday.",
            "It's at the courier's depot and should move in the next day or two.",
        ),
        "Do you sell gift cards?",
        "NEW_TOPIC",
    ),
    (
        (
            "Excel crashes every time I open a file from SharePoint.",
            "Please try repairing Office from Settings > Apps, then open the file again.",
        ),
        "Where do I find the licence key for Visio?",
        "NEW_TOPIC",
    ),
    (
        (
            "My dog's vaccination reminder says overdue, but we did it in March.",
            "I'll check his record and update it.",
        ),
        "Book the cat in for a nail trim next week.",
        "NEW_TOPIC",
    ),
    (
        ("The air conditioning in room 512 isn't cooling.", "Maintenance will be up within 20 minutes."),
        "Can I get a late checkout on Sunday?",
        "NEW_TOPIC",
    ),
    (
        ("My box came without the recipe cards.", "You can find all the recipes in the app under This Week."),
        "Skip next week's delivery please.",
        "NEW_TOPIC",
    ),
    (
        (
            "The movers scratched my dining table.",
            "Sorry about that. Send us photos and we'll open a damage claim.",
        ),
        "Do you offer storage for a few months?",
        "NEW_TOPIC",
    ),
    # a question or detail that leans on the thread: its object is what the thread is about
    (
        (
            "My debit card snapped in half.",
            "I've ordered a replacement; it will arrive in 3 to 5 working days.",
        ),
        "Is there a fee?",
        "FOLLOW_UP",
    ),
    (
        ("My flight to Lisbon was cancelled.", "I've rebooked you on tomorrow's 9:40 flight."),
        "Who pays for the hotel tonight?",
        "FOLLOW_UP",
    ),
    (
        (
            "My phone screen is cracked, can you fix it?",
            "Yes, a screen replacement is 129 euros and takes about an hour.",
        ),
        "Will I lose my photos?",
        "FOLLOW_UP",
    ),
    (
        ("There's been no hot water since this morning.", "An engineer will come between 2 and 6 today."),
        "Does someone need to be home?",
        "FOLLOW_UP",
    ),
    (
        (
            "The parking machine took my money but gave no ticket.",
            "I've logged it; the refund goes back to your card within 5 days.",
        ),
        "What do I show the warden in the meantime?",
        "FOLLOW_UP",
    ),
    (
        (
            "The driver gave my order to someone else.",
            "I'm sorry; I've sent a new order, it will arrive in about 30 minutes.",
        ),
        "Do I get charged for the second one?",
        "FOLLOW_UP",
    ),
    (
        (
            "My new SIM hasn't activated after 24 hours.",
            "I've pushed the activation again; please restart your phone in an hour.",
        ),
        "Do I keep my old number?",
        "FOLLOW_UP",
    ),
    (
        ("My grocery order is missing the eggs.", "I've refunded 3.20 for the eggs."),
        "The tomatoes were squashed as well.",
        "FOLLOW_UP",
    ),
]


@pytest.mark.parametrize(("context", "text", "expected"), BARE)
def test_a_bare_new_subject_opens_a_thread_and_a_detail_that_leans_on_it_does_not(
    context: tuple[str, str], text: str, expected: str
) -> None:
    decision = place_after(context, text)

    assert decision.event == expected, decision.signals


@pytest.mark.parametrize(
    ("text", "vocabulary", "similarity", "expected"),
    [
        ("Do you sell gift cards?", {"lamp", "tracking"}, 0.07, True),
        ("How do I pay for the school trip online?", {"timetable", "portal"}, 0.33, True),
        ("Skip next week's delivery please.", {"recipe", "cards"}, 0.24, True),
        # too close to the thread, or in its words
        ("Do you sell gift cards?", {"lamp", "tracking"}, 0.40, False),
        ("Do you sell gift cards?", {"gift", "vouchers"}, 0.07, False),
        # leans on the thread: a pronoun, "one", a continuity word, a detail of what it found
        ("Can I have my money back rather than a new one?", {"courier", "parcel"}, 0.1, False),
        ("Can I still drive it to work?", {"tree", "car", "claim"}, 0.1, False),
        ("Can I know the total cost?", {"hotel", "booking"}, 0.1, False),
        ("Do you have anything starring Dimiter Marinov?", {"movie", "drama"}, 0.1, False),
        # not a self-contained form: a short or open question whose object the thread implies
        ("Is there a fee?", {"card", "replacement"}, 0.16, False),
        ("Who pays for the hotel tonight?", {"flight", "cancelled"}, 0.13, False),
    ],
)
def test_names_own_subject(text: str, vocabulary: set[str], similarity: float, expected: bool) -> None:
    assert names_own_subject(text, content_words(text), vocabulary, similarity) is expected


def test_the_own_subject_rule_is_for_the_task_profile_only() -> None:
    problem, reply = BARE[0][0]
    task = place_after((problem, reply), "Do you sell gift cards?")
    chitchat = place_after((problem, reply), "Do you sell gift cards?", profile="chitchat")

    assert task.signals["p_new_topic"] < load_model("task").new_topic.threshold
    assert task.signals["reason"].startswith("a subject of its own")
    assert not chitchat.signals["reason"].startswith("a subject of its own")
