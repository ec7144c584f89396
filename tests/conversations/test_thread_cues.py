"""The thread scorer's support-chat cues, the shipped model file, and the turns customers actually write."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta

import numpy as np
import pytest

from agentflow import AgentFrameworkBuilder
from agentflow.embeddings import get_embedder
from conversations.models import Thread
from conversations.thread_detection import Candidate, came_back, decide_thread, not_fixed_yet
from conversations.thread_features import (
    FIX_CUE,
    MODEL_PATH,
    N_CHITCHAT,
    N_HAND,
    NOT_FIXED_CUE,
    PROTOTYPES,
    TOPIC_MARKER,
    ThreadState,
    content_words,
    load_model,
    not_fixed_cue,
    prototypes,
    turn_features,
)
from memory.models import Memory

NOW = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


def _embed(text: str) -> np.ndarray:
    return get_embedder().embed_one(text)


# --- each cue --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "Switching the port solved it.",
        "Replacing the cartridge did the trick",
        "running it as administrator worked, thanks!",
        "it's on my statement now, thanks",
        "Tightened the guides and no more jams",
        "Never mind, I found it in the settings",
        "The refund arrived this morning",
        "Switching to HD stopped the freezing",
        "the clicking went away after the update",
        "It's syncing again",
        "We can stream again since the reset",
        # "never mind" in other words (support_fresh6.jsonl)
        "oh ignore me, my mate's just texted to say he grabbed it on the way out. sorry!",
        "ah don't worry, it was attached to the order confirmation email as a pdf all along",
        "Scratch that, the code came through",
        "it was in my spam folder all along",
    ],
)
def test_fix_cue_catches_saying_what_fixed_it(text: str) -> None:
    assert FIX_CUE.search(text)


@pytest.mark.parametrize(
    "text",
    [
        "That works for me, book it",
        "Is there a dark mode?",
        "I want to fix my address",
        "Find me a hotel",
        "The update stopped the printer working",
        "Windows stopped the app from opening",
        "The steps stopped syncing again overnight",
        "I can't log in again",
        "It's been broken all along",
        "Please don't ignore my complaint",
        "Should I ignore the warning light?",
    ],
)
def test_fix_cue_ignores_bookings_and_requests(text: str) -> None:
    assert not FIX_CUE.search(text)


@pytest.mark.parametrize(
    "text",
    [
        "Did that twice, still streaky.",
        "same error",
        "That didn't help",
        "nope, nothing happens",
        "It keeps failing",
    ],
)
def test_not_fixed_cue_catches_still_broken(text: str) -> None:
    assert NOT_FIXED_CUE.search(text)


@pytest.mark.parametrize("text", ["Thanks, that fixed it!", "Yes, book the 6pm table please"])
def test_not_fixed_cue_ignores_fixes_and_plain_answers(text: str) -> None:
    assert not NOT_FIXED_CUE.search(text)


@pytest.mark.parametrize(
    ("text", "not_fixed"),
    [
        ("we're back online again", False),
        ("I can log in again, thanks", False),
        ("The app is syncing again", False),
        ("My login is broken again", True),
        ("It stopped working again", True),
        ("It isn't loading again", True),
        ("I can see the same error again", True),
    ],
)
def test_again_after_a_restoration_is_no_recurrence_in_the_features(text: str, not_fixed: bool) -> None:
    assert not_fixed_cue(text) is not_fixed


@pytest.mark.parametrize(
    "text",
    [
        "By the way, how do I change my PIN?",
        "btw can I pay with Klarna",
        "One more thing: do you ship to Ireland?",
        "And how do I order new toner?",
        "Also, my invoice is wrong.",
        "Separate question, is there an app?",
        "Forget the ink, how do I scan to email?",
    ],
)
def test_topic_marker_catches_discourse_markers(text: str) -> None:
    assert TOPIC_MARKER.search(text)


@pytest.mark.parametrize(
    "text", ["I also tried restarting it", "and it still fails", "Thanks, that's all", "What is the way in?"]
)
def test_topic_marker_ignores_mid_sentence_also_and_plain_and(text: str) -> None:
    assert not TOPIC_MARKER.search(text)


def test_features_carry_the_cues_and_prototype_similarities() -> None:
    problem = _embed("My printer shows error E42")
    state = ThreadState(problem, problem, problem.copy(), content_words("My printer shows error E42"))

    fixed = turn_features("Cleaning the roller fixed it", _embed("Cleaning the roller fixed it"), state)
    broken = turn_features("It still shows the same error", _embed("It still shows the same error"), state)
    shift = turn_features(
        "By the way, how do I order toner?", _embed("By the way, how do I order toner?"), state
    )

    assert fixed.shape == broken.shape == (N_HAND + 384,)
    # the cue block: fix, not fixed, topic marker, fix without negation; then the prototype similarities
    assert fixed[16:20].tolist() == [1.0, 0.0, 0.0, 1.0]
    assert broken[16:20].tolist() == [0.0, 1.0, 0.0, 0.0]
    assert shift[16:20].tolist() == [0.0, 0.0, 1.0, 0.0]
    # The prototype similarities follow: each of these is closest to its own kind. (They are weaker
    # than the cues on detailed turns: MiniLM weighs the topic more than whether it got fixed.)
    for text, kind in [
        ("That did the trick, thanks!", "resolution"),
        ("It still shows the same error", "not_fixed"),
        ("By the way, how do I order toner?", "new_topic"),
        ("One more thing, can I ask about my bill?", "new_topic"),
    ]:
        row = turn_features(text, _embed(text), state)
        assert row[20:23].tolist() == pytest.approx((prototypes() @ _embed(text)).tolist(), abs=1e-5)
        assert PROTOTYPES[int(np.argmax(row[20:23]))] == kind, (text, row[20:23])


@pytest.mark.parametrize(
    ("text", "vetoed"),
    [
        ("I cleaned it but it still shows E42", True),
        ("Thanks, but that didn't help", True),
        ("Still streaky after the deep clean, thanks anyway", True),
        ("It didn't work at first, but restarting fixed it", False),
        ("Nope, that's all, thanks", False),
        ("Thanks, that fixed it!", False),
        ("The readings are coming through again since the reset", False),
        # partly fixed: what follows "but" is a problem, not another fix
        ("The sound is back but now the picture flickers", True),
        ("That fixed the login, but now it asks for a code I never get", True),
        ("It charges now but the battery stays at 10 percent", True),
        ("It took a while but now it works", False),
        ("Restarting worked, but only after two tries", False),
    ],
)
def test_not_fixed_yet_vetoes_a_resolution_only_without_a_fix_or_a_closing(text: str, vetoed: bool) -> None:
    assert not_fixed_yet(text) is vetoed


@pytest.mark.parametrize(
    ("text", "back"),
    [
        ("My login is broken again", True),
        ("The steps stopped syncing again overnight", True),
        ("The E42 error came back", True),
        ("Thanks again!", False),
        ("The readings are coming through again since the reset", False),
        ("It's moving again, cheers", False),
    ],
)
def test_came_back_needs_the_problem_said_to_return_not_a_bare_again(text: str, back: bool) -> None:
    assert came_back(text) is back


def test_a_vetoed_resolution_is_a_follow_up_and_says_why() -> None:
    vector = _embed(PRINTER)
    state = ThreadState(vector, vector, vector.copy(), content_words(PRINTER), PRINTER_TIP)
    text = "I cleaned it but it still shows E42"

    decision = decide_thread(
        text=text,
        embedding=_embed(text),
        candidates=[Candidate("printer", state, NOW - timedelta(minutes=1))],
        now=NOW,
        inactivity=timedelta(minutes=30),
        model=load_model("task"),
    )

    assert (decision.event, decision.thread_id) == ("FOLLOW_UP", "printer")
    if decision.signals["p_resolution"] >= load_model("task").resolution.threshold:
        assert decision.signals["resolution_vetoed"] == "not fixed yet"
    else:
        assert "resolution_vetoed" not in decision.signals


# --- the shipped model file ------------------------------------------------------------------------


def test_shipped_model_loads_with_its_version_recorded_on_each_decision() -> None:
    data = json.loads(MODEL_PATH.read_text())
    model = load_model("task")

    assert data["n_hand"] == N_HAND and data["embedding_model"] == get_embedder().model_id
    assert model.version == data["version"] and model.version
    assert prototypes().shape == (len(PROTOTYPES), 384)
    assert np.allclose(np.linalg.norm(prototypes(), axis=1), 1.0, atol=1e-3)
    for profile in ("task", "chitchat"):
        for scorer in (load_model(profile).new_topic, load_model(profile).resolution):
            assert scorer.weights.shape == scorer.mean.shape == scorer.scale.shape
            # the chitchat profile's feature set appends its chat cues after the embedding
            widths = {
                "task": (N_HAND, N_HAND + 384),
                "chitchat": (N_HAND, N_HAND + 384, N_HAND + 384 + N_CHITCHAT),
            }
            assert scorer.weights.shape[0] in widths[load_model(profile).feature_set]
            assert 0.0 < scorer.threshold < 1.0
    problem = _embed("My printer is broken")
    state = ThreadState(problem, problem, problem.copy(), {"printer", "broken"})
    decision = decide_thread(
        text="It still does not print",
        embedding=_embed("It still does not print"),
        candidates=[Candidate("printer", state, NOW)],
        now=NOW,
        inactivity=timedelta(minutes=30),
        model=model,
    )
    assert decision.signals["model_version"] == model.version


def test_a_model_file_for_other_features_is_refused(tmp_path) -> None:
    data = json.loads(MODEL_PATH.read_text())
    stale = tmp_path / "thread_model.json"
    stale.write_text(json.dumps({**data, "n_hand": 16}))

    with pytest.raises(ValueError, match="16 hand features"):
        load_model("task", str(stale))


def test_an_unknown_profile_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown threading profile 'gossip'"):
        load_model("gossip")


# --- the shipped model places the turns quoted in the issue ---------------------------------------

PRINTER = "My printer shows error E42 and won't print double-sided."
PRINTER_TIP = "E42 usually means the duplex roller is dirty. Could you clean it with a lint-free cloth?"

QUOTED = [
    # (the problem, the assistant's last reply, the customer's turn, expected event)
    (PRINTER, PRINTER_TIP, "Thanks, cleaning the duplex roller fixed the E42 error!", "RESOLUTION"),
    (
        "The printer is connected but my laptop says it's offline.",
        "Please try plugging the USB cable into a different port.",
        "switching the port solved it",
        "RESOLUTION",
    ),
    (
        "My scanner isn't showing up in the scan app",
        "Could you try running the scan app as administrator?",
        "running it as administrator worked, thanks!",
        "RESOLUTION",
    ),
    (
        "I was charged twice for the same purchase.",
        "I've raised a dispute for the duplicate charge.",
        "it's on my statement now, thanks",
        "RESOLUTION",
    ),
    (PRINTER, PRINTER_TIP, "I cleaned it but it still shows E42", "FOLLOW_UP"),
    (PRINTER, PRINTER_TIP, "That didn't help, same error", "FOLLOW_UP"),
    (PRINTER, PRINTER_TIP, "Thanks, but it still doesn't print double-sided", "FOLLOW_UP"),
    (PRINTER, PRINTER_TIP, "nope, that's all, bye", "RESOLUTION"),
    (
        "My card was declined at a shop abroad",
        "Turn on international payments in the app's card settings.",
        "By the way, how do I change my PIN?",
        "NEW_TOPIC",
    ),
    (PRINTER, PRINTER_TIP, "And how do I order new toner cartridges?", "NEW_TOPIC"),
]


@pytest.mark.parametrize(("problem", "reply", "text", "expected"), QUOTED)
def test_shipped_model_places_quoted_support_turns(
    problem: str, reply: str, text: str, expected: str
) -> None:
    vector = _embed(problem)
    state = ThreadState(vector, vector, vector.copy(), content_words(problem) | content_words(reply), reply)

    decision = decide_thread(
        text=text,
        embedding=_embed(text),
        candidates=[Candidate("problem", state, NOW - timedelta(minutes=1))],
        now=NOW,
        inactivity=timedelta(minutes=30),
        model=load_model("task"),
    )

    assert decision.event == expected, decision.signals


@pytest.mark.django_db(transaction=True)
@pytest.mark.integration
async def test_a_fix_described_in_the_thanks_resolves_the_thread_and_is_remembered(
    celery_worker, settings
) -> None:
    settings.AGENTFLOW = {**settings.AGENTFLOW, "BACKGROUND_JOBS": True}
    agent = await (
        AgentFrameworkBuilder()
        .with_intent_categories([])
        .with_config({"fallback_config": {"escalate": False}})
        .build(None)
    )
    opened = await agent.process_message(user_id="duplex", message=PRINTER)
    await agent.record_message(user_id="duplex", content=PRINTER_TIP)

    thanks = await agent.process_message(
        user_id="duplex", message="Thanks, cleaning the duplex roller fixed the E42 error!"
    )

    assert (thanks["thread_event"], thanks["thread_id"]) == ("RESOLUTION", opened["thread_id"])
    thread = await Thread.objects.aget(pk=opened["thread_id"])
    assert (thread.status, thread.resolution) == (
        "resolved",
        "Thanks, cleaning the duplex roller fixed the E42 error!",
    )
    for _ in range(100):  # the worker writes the memory off the hot path
        if await Memory.objects.filter(user__external_id="duplex").aexists():
            break
        await asyncio.sleep(0.1)
    memory = await Memory.objects.aget(user__external_id="duplex", kind="episodic")
    assert memory.content.startswith(f"Problem: {PRINTER}")
    assert "duplex roller" in memory.content and "E42" in memory.content
    assert memory.source["thread"] == opened["thread_id"]
