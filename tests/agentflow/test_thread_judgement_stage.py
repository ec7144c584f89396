"""The LLM judges the second stage's uncertain band (issue 16): a thread the stage for unmarked shifts
opened with its P just above its threshold, or a continuation it read with P just below, is put to
the LLM before it is stored; outside the band, offline or turned off, nothing is asked; an LLM failure
leaves the stage's decision. When a judgement may follow, the stage's gate settles no message whose
best case is within the margin (its P is needed, not a bound). Through ``process_message`` (real
database) against the fake Messages API.

Each case's P is read first from an offline agent (``detect_thread``), and the margins are set around it,
so a refitted stage moves the cases, not the tests' meaning; the preconditions say when a case no longer
serves (the scorer's own probabilities must stay outside the margin, so it is the stage's band that is
judged)."""

from __future__ import annotations

from typing import Any

import pytest

from agentflow import AgentFrameworkBuilder
from agentflow.testing.fake_anthropic import FakeReply, ToolCall
from conversations.models import Message, Thread
from conversations.thread_detection import shift_stage
from conversations.thread_features import load_model

pytestmark = pytest.mark.django_db(transaction=True)

STAGE = "a subject of its own, by the second stage (not the scorer)"
REFUND = ("I got a double booking charge for my haircut.", "I've refunded the duplicate £35.")
SOFTENER = (
    "My water softener is showing an E3 error.",
    "Check the salt level and top it up if it's below the water line.",
)
SHIFT = (*REFUND, "Do you do beard trims?")  # the stage opens a thread, P a little above its threshold
LEAN = (*REFUND, "How many days until I see the money?")  # the stage reads it and keeps it, P a little below
SETTLED = (*SOFTENER, "The salt tank is full already.")  # the gate settles it offline, bound near
NEAR = 0.02  # how far inside (or outside) the band the margins put a case


async def _agent(client: Any, margin: float, name: str, **session: object):
    config = {"name": name, "session_config": {"judgement_margin": margin, **session}}
    return await AgentFrameworkBuilder().with_intent_categories([]).with_config(config).build(client)


async def _turn(agent, user: str, case: tuple[str, str, str]) -> tuple[dict, dict]:
    """The problem placed, the assistant's reply recorded, then the case's message as a whole turn."""
    problem, reply, text = case
    opened = await agent.detect_thread(user_id=user, message=problem)
    await agent.record_message(user_id=user, content=reply)
    return opened, await agent.process_message(user_id=user, message=text)


async def _offline(case: tuple[str, str, str], user: str, margin: float = 0.0) -> dict[str, Any]:
    """The stored signals of the case's message, placed by an offline agent (no LLM)."""
    _, result = await _turn(await _agent(None, margin, "stage-band-offline"), user, case)
    return await _signals(result)


async def _signals(result: dict[str, Any]) -> dict[str, Any]:
    return (await Message.objects.aget(pk=result["message_id"])).thread_signals


def _stage_distance(signals: dict[str, Any]) -> float:
    """How far the stage's P (or, for a message the gate settled, its bound) is from its threshold."""
    p = signals.get("p_shift_stage", signals.get("p_shift_stage_max"))
    assert p is not None, signals
    return abs(p - shift_stage().threshold)


def _scorer_outside(signals: dict[str, Any], margin: float) -> None:
    """Precondition: the scorer's own probabilities are farther than ``margin`` from their thresholds."""
    model = load_model("task")
    assert abs(signals["p_new_topic"] - model.new_topic.threshold) >= margin, signals
    assert abs(signals["p_resolution"] - model.resolution.threshold) >= margin, signals


def _verdicts(fake, verdict: dict[str, Any] | None = None):
    """Answer every ``place_message`` request with ``verdict`` (an HTTP 500 when None); replies echo."""

    def respond(body: dict[str, Any]) -> FakeReply | None:
        if (body.get("tool_choice") or {}).get("name") != "place_message":
            return None
        if verdict is None:
            return FakeReply(status=500, error_type="api_error", error_message="scripted failure")
        return FakeReply(tool_calls=[ToolCall("place_message", verdict)])

    fake.responder = respond


def _judge_requests(fake) -> list[dict]:
    return [r["body"] for r in fake.requests if (r["body"] or {}).get("tool_choice")]


async def test_a_thread_the_stage_opened_within_the_margin_is_judged_and_the_verdict_taken(
    anthropic_client, fake_llm
) -> None:
    offline = await _offline(SHIFT, "band-shift-offline")
    assert offline["reason"] == STAGE and offline["p_shift_stage"] >= shift_stage().threshold
    margin = _stage_distance(offline) + NEAR
    _scorer_outside(offline, margin)
    agent = await _agent(anthropic_client, margin, "stage-band")
    _verdicts(fake_llm, {"event": "FOLLOW_UP", "thread": "T1", "confidence": 0.7})

    opened, placed = await _turn(agent, "band-shift", SHIFT)

    assert (placed["thread_event"], placed["thread_id"]) == ("FOLLOW_UP", opened["thread_id"])
    assert placed["thread_confidence"] == 0.7
    judge = _judge_requests(fake_llm)
    assert len(judge) == 1
    assert "New user message: 'Do you do beard trims?'" in judge[0]["messages"][0]["content"]
    stored = await Message.objects.aget(pk=placed["message_id"])
    assert stored.thread_signals["reason"] == "LLM judgement"
    assert stored.thread_signals["scorer_decision"] == {"event": "NEW_TOPIC", "thread_id": None}
    assert stored.thread_signals["p_shift_stage"] == offline["p_shift_stage"]
    assert await Thread.objects.filter(user__external_id="band-shift").acount() == 1


async def test_a_continuation_the_stage_almost_opened_is_judged_and_the_verdict_taken(
    anthropic_client, fake_llm
) -> None:
    offline = await _offline(LEAN, "band-lean-offline")
    assert offline["reason"] == "scorer: continues" and offline["p_shift_stage"] < shift_stage().threshold
    margin = _stage_distance(offline) + NEAR
    _scorer_outside(offline, margin)
    agent = await _agent(anthropic_client, margin, "stage-band")
    _verdicts(fake_llm, {"event": "NEW_TOPIC", "confidence": 0.85})

    opened, placed = await _turn(agent, "band-lean", LEAN)

    assert placed["thread_event"] == "NEW_TOPIC" and placed["thread_id"] != opened["thread_id"]
    assert len(_judge_requests(fake_llm)) == 1
    stored = await Message.objects.aget(pk=placed["message_id"])
    assert stored.thread_signals["reason"] == "LLM judgement"
    assert stored.thread_signals["scorer_decision"] == {
        "event": "FOLLOW_UP",
        "thread_id": opened["thread_id"],
    }
    assert await Thread.objects.filter(user__external_id="band-lean").acount() == 2


@pytest.mark.parametrize(("case", "event"), [(SHIFT, "NEW_TOPIC"), (LEAN, "FOLLOW_UP")])
async def test_outside_the_band_the_llm_is_not_asked(anthropic_client, fake_llm, case, event) -> None:
    offline = await _offline(case, f"outside-{event}-offline")
    margin = _stage_distance(offline) - NEAR
    assert margin > 0
    agent = await _agent(anthropic_client, margin, "stage-band")
    _verdicts(fake_llm, {"event": "RETURN", "thread": "T1"})  # would be taken, were it asked

    opened, placed = await _turn(agent, f"outside-{event}", case)

    assert _judge_requests(fake_llm) == []
    assert placed["thread_event"] == event
    assert (placed["thread_id"] == opened["thread_id"]) is (event == "FOLLOW_UP")
    stored = await Message.objects.aget(pk=placed["message_id"])
    assert "llm_judgement" not in stored.thread_signals
    assert stored.thread_signals["p_shift_stage"] == offline["p_shift_stage"]


@pytest.mark.parametrize(
    ("case", "event", "reason"), [(SHIFT, "NEW_TOPIC", STAGE), (LEAN, "FOLLOW_UP", None)]
)
async def test_an_llm_failure_leaves_the_stages_decision(
    anthropic_client, fake_llm, case, event, reason
) -> None:
    offline = await _offline(case, f"failure-{event}-offline")
    agent = await _agent(anthropic_client, _stage_distance(offline) + NEAR, "stage-band")
    _verdicts(fake_llm, None)  # HTTP 500 on every judgement (the structured call retries once)

    opened, placed = await _turn(agent, f"failure-{event}", case)

    assert len(_judge_requests(fake_llm)) == 2
    assert placed["thread_event"] == event
    assert (placed["thread_id"] == opened["thread_id"]) is (event == "FOLLOW_UP")
    assert placed["content"] == f"Echo: {case[2]}"  # the reply still came
    stored = await Message.objects.aget(pk=placed["message_id"])
    assert stored.thread_signals["llm_judgement"] == "unavailable"
    assert stored.thread_signals["reason"] == (reason or "scorer: continues")
    assert await Thread.objects.filter(user__external_id=f"failure-{event}").acount() == (
        2 if event == "NEW_TOPIC" else 1
    )


async def test_offline_or_turned_off_the_band_is_never_put_to_the_llm(anthropic_client, fake_llm) -> None:
    _verdicts(fake_llm, {"event": "FOLLOW_UP", "thread": "T1"})
    offline = await _offline(SHIFT, "never-offline", margin=0.5)
    turned_off = await _agent(anthropic_client, 0.5, "stage-band", llm_thread_judgement=False)

    _, placed = await _turn(turned_off, "never-off", SHIFT)

    assert _judge_requests(fake_llm) == []
    assert len(fake_llm.requests) == 1  # the online agent's reply, no judgement
    signals = await _signals(placed)
    assert offline["reason"] == signals["reason"] == STAGE
    assert placed["thread_event"] == "NEW_TOPIC"
    assert "llm_judgement" not in offline and "llm_judgement" not in signals


async def test_when_a_judgement_may_follow_the_gate_settles_no_message_within_the_margin(
    anthropic_client, fake_llm
) -> None:
    """Offline the gate settles the message on its bound (the reply never embedded); online, with the
    bound within the margin, the reply is embedded and the stored P is exact (at most the bound), and the
    LLM is asked exactly when that P is in the band. A bound below the band is still settled online, and
    a turned-off judgement leaves the gate as offline."""
    threshold = shift_stage().threshold
    offline = await _offline(SETTLED, "gate-offline", margin=0.5)  # offline, no margin reaches the gate
    assert offline["reason"] == "scorer: continues" and "p_shift_stage" not in offline
    bound = offline["p_shift_stage_max"]
    margin = _stage_distance(offline) + NEAR
    _scorer_outside(offline, margin)
    _verdicts(fake_llm, {"event": "FOLLOW_UP", "thread": "T1", "confidence": 0.9})

    opened, within = await _turn(
        await _agent(anthropic_client, margin, "gate-within"), "gate-within", SETTLED
    )
    asked = len(_judge_requests(fake_llm))
    _, below = await _turn(
        await _agent(anthropic_client, _stage_distance(offline) - NEAR, "gate-below"), "gate-below", SETTLED
    )
    _, off = await _turn(
        await _agent(anthropic_client, margin, "gate-off", llm_thread_judgement=False), "gate-off", SETTLED
    )

    signals = await _signals(within)
    assert "p_shift_stage_max" not in signals and signals["p_shift_stage"] <= bound < threshold
    assert asked == (1 if threshold - signals["p_shift_stage"] < margin else 0)
    assert (within["thread_event"], within["thread_id"]) == ("FOLLOW_UP", opened["thread_id"])
    for settled in (below, off):
        assert settled["thread_event"] == "FOLLOW_UP"
        kept = await _signals(settled)
        assert kept["p_shift_stage_max"] == bound and "p_shift_stage" not in kept
    assert len(_judge_requests(fake_llm)) == asked
