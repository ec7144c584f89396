"""The support-chat shapes issue 16 lists, placed through the public API (``Agent.detect_thread``).

Each case is one fresh customer: their problem, the assistant's reply (``record_message``), then the
turn under test. A resolution must resolve the problem's thread (that is what writes the memory of
the fix); a topic shift must open another thread; a not-yet-fixed follow-up must stay in the
problem's thread and leave it open. The sentences are the issue's own shapes; nothing in the code
matches these strings.
"""

from __future__ import annotations

import pytest

from agentflow import AgentFrameworkBuilder
from conversations.models import Thread

pytestmark = pytest.mark.django_db(transaction=True)

PRINTER = "My printer shows error E42 and won't print double-sided."
PRINTER_TIP = "E42 usually means the duplex roller is dirty. Could you clean it with a lint-free cloth?"
OFFLINE = "The printer is connected but my laptop says it's offline."
OFFLINE_TIP = "Please try plugging the USB cable into a different port on the laptop."
SCANNER = "My scanner isn't showing up in the scan app"
SCANNER_TIP = "Could you try running the scan app as administrator?"
CHARGE = "I was charged twice for the same purchase at the supermarket."
CHARGE_TIP = "I've raised a dispute for the duplicate charge; the refund takes 2-3 days."
TONER = "The printout is very faint on the left side."
TONER_TIP = "Please take the toner cartridge out, shake it gently and put it back."
CARD = "My card was declined at a shop abroad."
CARD_TIP = "Please turn on international payments in the app's card settings."

CASES = [
    # (problem, assistant's reply, the customer's turn, expected event)
    (PRINTER, PRINTER_TIP, "Thanks, cleaning the duplex roller fixed the E42 error!", "RESOLUTION"),
    (OFFLINE, OFFLINE_TIP, "switching the port solved it", "RESOLUTION"),
    (TONER, TONER_TIP, "Shaking the toner did the trick", "RESOLUTION"),
    (SCANNER, SCANNER_TIP, "running it as administrator worked, thanks!", "RESOLUTION"),
    (CHARGE, CHARGE_TIP, "it's on my statement now, thanks", "RESOLUTION"),
    (CARD, CARD_TIP, "By the way, how do I change my PIN?", "NEW_TOPIC"),
    (PRINTER, PRINTER_TIP, "And how do I order new toner cartridges?", "NEW_TOPIC"),
    (CHARGE, CHARGE_TIP, "By the way, can I get a paper statement every month?", "NEW_TOPIC"),
    (PRINTER, PRINTER_TIP, "I cleaned it, still wrong", "FOLLOW_UP"),
    (PRINTER, PRINTER_TIP, "same error", "FOLLOW_UP"),
    (SCANNER, SCANNER_TIP, "that didn't help", "FOLLOW_UP"),
    (OFFLINE, OFFLINE_TIP, "Tried another port, same error as before", "FOLLOW_UP"),
]


@pytest.mark.parametrize(("problem", "reply", "text", "expected"), CASES)
async def test_the_issues_support_shapes_are_placed_right(
    problem: str, reply: str, text: str, expected: str
) -> None:
    agent = await AgentFrameworkBuilder().with_intent_categories([]).build(None)
    opened = await agent.detect_thread(user_id="shape", message=problem)
    await agent.record_message(user_id="shape", content=reply)

    placed = await agent.detect_thread(user_id="shape", message=text)

    assert placed["thread_event"] == expected, placed["signals"]
    problem_thread = await Thread.objects.aget(pk=opened["thread_id"])
    if expected == "NEW_TOPIC":
        assert placed["thread_id"] != opened["thread_id"]
        assert problem_thread.status != "resolved"
    else:
        assert placed["thread_id"] == opened["thread_id"]
        assert (problem_thread.status == "resolved") == (expected == "RESOLUTION")
        if expected == "RESOLUTION":
            assert problem_thread.resolution == text
