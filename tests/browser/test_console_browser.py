"""The ops console in a real browser at 1280x800: every admin list and change page fits the screen,
and the hand-off inbox works end to end (a live alert, claim, reply into the widget, hand back).

The whole stack is real (daphne over TCP, PostgreSQL, Redis, a Celery worker). No LLM is configured
in these tests, so the agent runs in offline mode, which hands every message to a human: that is the
hand-off the inbox receives.
"""

from __future__ import annotations

import os
import re
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from django.contrib import admin
from django.urls import reverse
from django.utils import timezone
from playwright.async_api import Page, expect

from conversations.handoff import escalation_claim
from conversations.models import CannedReply, Escalation, Message
from tests.conversations.factories import MessageFactory

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

VIEWPORT = {"width": 1280, "height": 800}
WIDGET = "agentflow-chat"
SCREENSHOTS = (
    Path(os.environ.get("AGENTFLOW_SCREENSHOTS", "")) if os.environ.get("AGENTFLOW_SCREENSHOTS") else None
)

# Every visible element whose box reaches past the right edge of the viewport (or the page itself
# scrolling sideways). Elements clipped inside a scrolling box count too: a column you have to scroll
# to is what "off-screen at 1280 px" meant.
OVERFLOWING = """() => {
  const width = window.innerWidth;
  const found = [];
  const doc = document.documentElement;
  if (doc.scrollWidth > width) found.push("the page scrolls sideways: scrollWidth " + doc.scrollWidth);
  const label = (el) => el.tagName.toLowerCase() + (el.id ? "#" + el.id : "") +
    (el.className && typeof el.className === "string" ? "." + el.className.trim().split(/\\s+/).join(".") : "");
  for (const el of document.body.querySelectorAll("*")) {
    const box = el.getBoundingClientRect();
    if (box.width === 0 || box.height === 0) continue;
    const style = getComputedStyle(el);
    if (style.visibility !== "visible" || el.closest("[hidden], template, .skip-to-content-link")) continue;
    // The element's own box, or content spilling out of it (a long word, a wide child) when it
    // does not clip: text is not an element, so it is caught through the element that holds it.
    const spills = style.overflowX === "visible" ? box.left + el.scrollWidth : box.right;
    const right = Math.max(box.right, spills);
    if (right <= width + 0.5) continue;
    found.push(label(el) + " right=" + Math.round(right));
    if (found.length > 8) break;
  }
  return found;
}"""


async def _login(page: Page, base_url: str, next_path: str = "/admin/") -> None:
    await page.goto(f"{base_url}/admin/login/?next={next_path}")
    await page.fill("#id_username", "ops")
    await page.fill("#id_password", "ops-password-123")
    await page.click("input[type=submit]")
    await expect(page.locator("#user-tools")).to_contain_text("Dana")


def _seed(staff: Any) -> None:
    """At least one row of every model the admin shows, with long texts where they hurt most."""
    from asgiref.sync import async_to_sync
    from axes.models import AccessAttempt, AccessFailureLog, AccessLog
    from django.contrib.auth.models import Group

    from agentflow import AgentFrameworkBuilder, IntentCategory
    from agentflow.embeddings import get_embedder
    from conversations.services import api_key_create
    from memory.services import memory_add

    agent = (
        AgentFrameworkBuilder()
        .with_intent_categories(
            [
                IntentCategory("BILLING_AND_INVOICES_QUESTIONS", "Invoices, refunds and charges", ["refund"]),
                IntentCategory("OUTAGE", "Production issues", ["Service is down", "Error 500"]),
            ]
        )
        .build_sync(None)
    )
    long_text = "My card was declined twice at checkout and the invoice https://example.com/" + "x" * 120
    turn = async_to_sync(agent.process_message)(
        user_id="customer-with-a-rather-long-identifier", message=long_text
    )
    escalation = Escalation.objects.get(thread_id=turn["thread_id"])
    escalation_claim(escalation=escalation, staff_user=staff)
    user = escalation.user
    MessageFactory(
        thread=escalation.thread, content="Hello? Is anyone there? The shop says my card is blocked."
    )
    for who, text, minutes in (
        ("maria.k", "I want to speak to a manager about my refund", 22),
        ("jo-88", "Error 500 on every page since this morning", 9),
        ("li.wei", "How do I change the email on my account?", 1),
    ):
        other = async_to_sync(agent.process_message)(user_id=who, message=text)
        Escalation.objects.filter(thread_id=other["thread_id"]).update(
            created_at=timezone.now() - timedelta(minutes=minutes)
        )
    api_key_create(name="host backend of the shop", agent=user.agent)
    CannedReply.objects.create(title="Looking into it", body="Thanks, I am looking into it right now.")
    CannedReply.objects.create(title="Refund timing", body="Refunds reach your card within 5 working days.")
    memory_add(user=user, kind="fact", content="Prefers email over phone. " * 4, embedder=get_embedder())
    Group.objects.create(name="support agents")
    attempt = AccessAttempt.objects.create(
        user_agent="Mozilla/5.0 " * 10,
        ip_address="10.0.0.1",
        username="mallory",
        http_accept="*/*",
        path_info="/admin/login/",
        get_data="",
        post_data="username=mallory",
        failures_since_start=3,
    )
    AccessLog.objects.create(
        user_agent="Mozilla/5.0 " * 10,
        ip_address="10.0.0.1",
        username="ops",
        http_accept="*/*",
        path_info="/admin/login/",
        session_hash="a" * 64,
    )
    AccessFailureLog.objects.create(
        user_agent="Mozilla/5.0 " * 10,
        ip_address="10.0.0.1",
        username="mallory",
        http_accept="*/*",
        path_info="/admin/login/",
        locked_out=False,
    )
    assert attempt.pk


def _admin_pages() -> list[tuple[str, str, str | None]]:
    """(model label, changelist URL, change URL of one row) for every model registered in the admin."""
    pages = []
    for model, model_admin in admin.site._registry.items():
        opts = model._meta
        changelist = reverse(f"admin:{opts.app_label}_{opts.model_name}_changelist")
        first = model_admin.get_queryset(_request()).first()
        change = (
            reverse(f"admin:{opts.app_label}_{opts.model_name}_change", args=[first.pk]) if first else None
        )
        pages.append((opts.label, changelist, change))
    return sorted(pages)


def _request() -> Any:
    from django.contrib.auth import get_user_model
    from django.test import RequestFactory

    request = RequestFactory().get("/admin/")
    request.user = get_user_model().objects.get(username="ops")
    return request


async def test_every_admin_list_and_change_page_fits_1280_by_800(
    live_asgi_url: str, chromium: Any, celery_worker: Any, staff: Any
) -> None:
    await sync_to_async(_seed)(staff)
    pages = await sync_to_async(_admin_pages)()
    assert [label for label, _, change in pages if change is None] == []  # every model has a seeded row
    context = await chromium.new_context(viewport=VIEWPORT)
    page = await context.new_page()
    await _login(page, live_asgi_url)

    problems: dict[str, list[str]] = {}
    extra = [
        reverse("admin:index"),
        reverse("admin:conversations_escalation_inbox"),
        reverse("admin:conversations_enduser_live", args=[(await Escalation.objects.afirst()).user_id]),
    ]
    urls = [url for _, changelist, change in pages for url in (changelist, change)] + extra
    claimed = await Escalation.objects.filter(status="claimed").afirst()
    inbox_url = reverse("admin:conversations_escalation_inbox") + f"?e={claimed.pk}"
    escalation_url = reverse("admin:conversations_escalation_change", args=[claimed.pk])
    urls += [inbox_url, escalation_url]
    shots = {inbox_url: "inbox.png", escalation_url: "escalation.png"}
    for url in urls:
        response = await page.goto(f"{live_asgi_url}{url}")
        assert response is not None and response.status == 200, url
        found = await page.evaluate(OVERFLOWING)
        if found:
            problems[url] = found
        if SCREENSHOTS is not None and url in shots:
            if url == inbox_url:
                await page.wait_for_function("window.AgentFlowInbox.queueReady")
            await page.screenshot(path=str(SCREENSHOTS / shots[url]))
    assert problems == {}, "\n".join(f"{url}: {found}" for url, found in problems.items())
    assert len(urls) >= 2 * 15
    await context.close()


async def test_staff_get_a_live_alert_claim_reply_into_the_widget_and_hand_back(
    live_asgi_url: str, chromium: Any, celery_worker: Any, staff: Any
) -> None:
    await CannedReply.objects.acreate(title="Looking into it", body="Thanks, I am looking into it right now.")
    staff_context = await chromium.new_context(viewport=VIEWPORT)
    await staff_context.grant_permissions(["notifications"], origin=live_asgi_url)
    inbox = await staff_context.new_page()
    errors: list[str] = []
    inbox.on("pageerror", lambda error: errors.append(str(error)))
    await _login(inbox, live_asgi_url, "/admin/conversations/escalation/inbox/")
    await inbox.goto(f"{live_asgi_url}/admin/conversations/escalation/inbox/")
    await expect(inbox.locator("#af-rows-empty")).to_be_visible()
    await expect(inbox.locator("#af-live")).to_have_text("Live: new hand-offs appear here.")
    await inbox.keyboard.press("Shift")  # a first input: the browser lets the page's audio start

    # A user in the widget asks; with no LLM the turn hands the thread to a human.
    widget_context = await chromium.new_context()
    widget = await widget_context.new_page()
    await widget.goto(f"{live_asgi_url}/demo/")
    await widget.get_by_role("button", name=re.compile(r"^Open chat")).click()
    box = widget.get_by_role("textbox", name="Message")
    await box.fill("My card was declined twice")
    await box.press("Enter")

    row = inbox.locator("#af-rows li.af-row")
    await expect(row).to_have_count(1)
    await expect(row).to_contain_text("My card was declined twice")
    await expect(row).to_contain_text("offline mode")
    await expect(row).to_have_class(re.compile(r"\bis-new\b"))
    await expect(inbox.locator("#af-live")).to_contain_text("New hand-off from demo-")
    alerts = await inbox.evaluate(
        "({...window.AgentFlowInbox, notifications: window.AgentFlowInbox.notifications})"
    )
    assert (alerts["alerts"], alerts["sounds"]) == (1, 1)
    assert [n.startswith("New hand-off: demo-") for n in alerts["notifications"]] == [True]
    await expect(inbox.locator('[data-count="open"]')).to_have_text("1")

    # Keys: j selects the row, Enter opens it, c claims it, r goes to the reply box, 1 inserts a canned reply.
    await inbox.keyboard.press("j")
    await inbox.keyboard.press("Enter")
    await expect(inbox.locator(".af-detail-head")).to_contain_text("open")
    await expect(inbox.locator("#af-messages")).to_contain_text("My card was declined twice")
    await inbox.keyboard.press("c")
    await expect(inbox.locator(".messagelist")).to_contain_text("Claimed: escalation")
    await expect(inbox.locator(".af-detail-head")).to_contain_text("claimed by you")
    joined = widget.locator(f'{WIDGET} .af-note[data-role="system"]')
    await expect(joined.first).to_have_text("A member of our team (Dana) has joined the conversation.")
    await inbox.wait_for_function("window.AgentFlowInbox.userReady")
    await inbox.keyboard.press("r")
    await expect(inbox.locator("#af-reply-content")).to_be_focused()
    await inbox.keyboard.press("Escape")
    await inbox.keyboard.press("1")
    await expect(inbox.locator("#af-reply-content")).to_have_value("Thanks, I am looking into it right now.")
    await inbox.locator("#af-reply-content").press("End")
    await inbox.keyboard.type(" Dana here.")
    await inbox.keyboard.press("Enter")  # sent over the staff socket

    await expect(inbox.locator("#af-reply-content")).to_have_value("")
    staff_reply = widget.locator(f"{WIDGET} .af-msg--human_agent")
    await expect(staff_reply).to_contain_text("Thanks, I am looking into it right now. Dana here.")
    await expect(inbox.locator("#af-messages .role-human_agent")).to_contain_text("Dana here.")

    await inbox.keyboard.press("Escape")  # out of the reply box: keys act on the page again
    await inbox.keyboard.press("b")  # hand back to the bot
    await expect(inbox.locator(".messagelist")).to_contain_text("Handed back to the bot: escalation")
    await expect(widget.locator(f'{WIDGET} .af-note[data-role="system"]').last).to_have_text(
        "The assistant is back in this conversation."
    )
    escalation = await Escalation.objects.aget()
    assert (escalation.status, escalation.holder_id) == ("resolved", staff.pk)
    assert await Message.objects.filter(role="human_agent").acount() == 1
    if SCREENSHOTS is not None:
        await inbox.screenshot(path=str(SCREENSHOTS / "inbox-after.png"))
    assert errors == []
    await widget_context.close()
    await staff_context.close()
