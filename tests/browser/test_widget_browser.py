"""The chat widget in a real browser: the demo page, a streamed reply, safe markdown, a staff reply
sent from the admin arriving live, keyboard use and a phone-sized screen, and reconnecting.

The whole stack is real (daphne over TCP, PostgreSQL, Redis, a Celery worker); the LLM is the fake
Messages API on loopback.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from asgiref.sync import sync_to_async
from playwright.async_api import Page, WebSocketRoute, expect

from agentflow.testing.fake_anthropic import FakeReply
from conversations.handoff import escalation_open
from conversations.models import EndUser, Message, Thread

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

WIDGET = "agentflow-chat"
REPLY = (
    "Here is **bold** advice: <img src=x onerror=alert(1)> and `code`, "
    "see [the docs](https://example.com/docs) or [this](javascript:alert(2)). "
    "That is all I can say about cards for now, goodbye."
)
# Every mutation of a streaming bubble, recorded in the page: proves text arrived before the reply ended.
RECORD_STREAM = """() => {
  const root = document.querySelector("agentflow-chat").shadowRoot;
  window.streamed = [];
  new MutationObserver(() => {
    const node = root.querySelector("[data-streaming]");
    if (node) window.streamed.push(node.textContent);
  }).observe(root, {subtree: true, childList: true, characterData: true, attributes: true});
}"""


async def _read_position(user_pk: int) -> str:
    user = await EndUser.objects.aget(pk=user_pk)
    return str(user.last_read_message_id)


async def _until(read: Any, expected: Any, seconds: float = 10) -> None:
    """Poll ``await read()`` until it returns ``expected`` (the server records acks asynchronously)."""
    deadline = time.monotonic() + seconds
    value = await read()
    while value != expected and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        value = await read()
    assert value == expected


def _watch(page: Page) -> dict[str, list[str]]:
    """Collect alerts (an injected script would raise one) and uncaught page errors."""
    seen: dict[str, list[str]] = {"dialogs": [], "errors": []}

    async def on_dialog(dialog: Any) -> None:
        seen["dialogs"].append(dialog.message)
        await dialog.dismiss()

    page.on("dialog", on_dialog)
    page.on("pageerror", lambda error: seen["errors"].append(str(error)))
    return seen


async def _open_demo(page: Page, base_url: str, query: str = "") -> None:
    await page.goto(f"{base_url}/demo/{query}")
    launcher = page.get_by_role("button", name=re.compile(r"^Open chat"))
    await expect(launcher).to_have_attribute("aria-expanded", "false")
    await launcher.click()
    await expect(page.get_by_role("dialog", name="Acme support")).to_be_visible()
    await expect(page.get_by_role("textbox", name="Message")).to_be_focused()


async def _send(page: Page, text: str) -> None:
    box = page.get_by_role("textbox", name="Message")
    await box.fill(text)
    await box.press("Enter")


async def _ask_and_see_the_reply(page: Page, base_url: str, question: str, reply: str) -> None:
    """Open the demo page's widget, send ``question`` and wait for the assistant's ``reply``."""
    await _open_demo(page, base_url)
    await _send(page, question)
    await expect(page.locator(f"{WIDGET} .af-msg--assistant .af-body")).to_have_text(reply)


async def test_a_chat_streams_the_reply_renders_markdown_safely_and_shows_a_staff_reply_live(
    live_asgi_url: str, chromium: Any, celery_worker: Any, fake_llm: Any, staff: Any
) -> None:
    fake_llm.chunk_delay = 0.15  # one word per content_block_delta: the reply streams for a few seconds
    fake_llm.enqueue(FakeReply(text=REPLY))
    context = await chromium.new_context()
    page = await context.new_page()
    seen = _watch(page)
    await _open_demo(page, live_asgi_url)
    await page.evaluate(RECORD_STREAM)

    await _send(page, "My card was declined <b>twice</b>")

    mine = page.locator(f"{WIDGET} .af-msg--user")
    await expect(mine).to_have_count(1)
    await expect(mine).to_contain_text("My card was declined <b>twice</b>")
    await expect(mine.locator("b")).to_have_count(0)
    reply = page.locator(f"{WIDGET} .af-msg--assistant")
    await expect(reply).to_contain_text("goodbye.")
    await expect(reply).not_to_have_attribute("data-streaming", "true")
    streamed = await page.evaluate("window.streamed")
    partial = [text for text in streamed if "Here is" in text and "goodbye" not in text]
    assert partial, f"no partial text was shown before the end of the reply: {streamed!r}"
    # The final text replaced the streamed one: markdown, with the HTML shown as text.
    await expect(reply.locator("strong")).to_have_text("bold")
    await expect(reply.locator("code")).to_have_text("code")
    await expect(reply).to_contain_text("<img src=x onerror=alert(1)>")
    await expect(reply).to_contain_text("[this](javascript:alert(2))")
    await expect(reply.locator("img")).to_have_count(0)
    await expect(reply.locator("a")).to_have_count(1)
    await expect(reply.locator("a")).to_have_attribute("href", "https://example.com/docs")
    await expect(reply.locator("a")).to_have_attribute("rel", "noopener noreferrer nofollow")
    assert await page.locator(f"{WIDGET} img").count() == 0

    # A member of staff takes the conversation over in the admin and replies.
    user = await EndUser.objects.aget(external_id__startswith="demo-")
    thread = await Thread.objects.aget(user=user)
    stored = Message.objects.filter(thread=thread).order_by("created_at").values_list("role", "content")
    assert [row async for row in stored] == [
        ("user", "My card was declined <b>twice</b>"),
        ("assistant", REPLY),
    ]
    escalation = await sync_to_async(escalation_open)(
        thread=thread, message=None, reason="the user asked for a person"
    )
    admin_context = await chromium.new_context()
    admin = await admin_context.new_page()
    await admin.goto(f"{live_asgi_url}/admin/login/?next=/admin/conversations/escalation/")
    await admin.fill("#id_username", "ops")
    await admin.fill("#id_password", "ops-password-123")
    await admin.click("input[type=submit]")
    await admin.check(f'input[name="_selected_action"][value="{escalation.pk}"]')
    await admin.select_option("select[name=action]", "claim")
    await admin.click("button[name=index]")
    await expect(admin.locator(".messagelist")).to_contain_text("Claimed 1 escalation(s).")

    joined = page.locator(f'{WIDGET} .af-note[data-role="system"]')
    await expect(joined).to_have_text("A member of our team (Dana) has joined the conversation.")

    # With the panel closed (Escape gives the focus back to the bubble), the staff reply arrives unread.
    await page.keyboard.press("Escape")
    await expect(page.get_by_role("dialog", name="Acme support")).to_be_hidden()
    launcher = page.locator(f"{WIDGET} .af-launcher")
    await expect(launcher).to_be_focused()
    await admin.goto(f"{live_asgi_url}/admin/conversations/escalation/{escalation.pk}/reply/")
    await admin.fill(
        "#staff-reply-form textarea[name=content]", "Hi, Dana here. I have **refunded** the charge."
    )
    await admin.click("#staff-reply-form input[type=submit]")
    await expect(admin.locator(".messagelist")).to_contain_text("Reply sent.")

    await expect(launcher).to_have_attribute("aria-label", "Open chat: Acme support (1 unread)")
    await launcher.click()
    await expect(launcher).to_have_attribute("aria-label", "Close chat: Acme support")
    staff_reply = page.locator(f"{WIDGET} .af-msg--human_agent")
    await expect(staff_reply).to_contain_text("Hi, Dana here. I have refunded the charge.")
    await expect(staff_reply.locator("strong")).to_have_text("refunded")
    await expect(staff_reply.locator(".af-who")).to_have_text("Support team")
    background = "n => getComputedStyle(n).backgroundColor"
    assert await staff_reply.evaluate(background) != await reply.evaluate(background)
    staff_message = await Message.objects.aget(thread=thread, role="human_agent")
    await _until(lambda: _read_position(user.pk), str(staff_message.pk))  # the widget acked what it showed

    # A fresh page catches up from the server: the whole conversation, in order.
    await page.reload()
    await page.locator(f"{WIDGET} .af-launcher").click()
    shown = page.locator(f"{WIDGET} .af-log > [data-role]")
    await expect(shown).to_have_count(4)
    assert [await node.get_attribute("data-role") for node in await shown.all()] == [
        "user",
        "assistant",
        "system",
        "human_agent",
    ]
    await expect(shown.nth(1).locator("strong")).to_have_text("bold")
    assert seen == {"dialogs": [], "errors": []}
    await admin_context.close()
    await context.close()


async def test_the_widget_works_from_the_keyboard_full_screen_on_a_phone(
    live_asgi_url: str, chromium: Any
) -> None:
    context = await chromium.new_context(
        viewport={"width": 375, "height": 667}, is_mobile=True, has_touch=True
    )
    page = await context.new_page()
    seen = _watch(page)
    await page.goto(f"{live_asgi_url}/demo/")
    launcher = page.get_by_role("button", name=re.compile(r"^Open chat: Acme support"))

    await launcher.focus()
    await page.keyboard.press("Enter")

    dialog = page.get_by_role("dialog", name="Acme support")
    await expect(dialog).to_be_visible()
    assert await dialog.bounding_box() == {"x": 0, "y": 0, "width": 375, "height": 667}
    await expect(page.get_by_role("textbox", name="Message")).to_be_focused()
    await expect(page.get_by_role("log", name="Messages")).to_have_attribute("aria-live", "polite")
    close = page.get_by_role("button", name="Close chat")
    await expect(close).to_be_visible()
    # The host page styles every button hotpink with a dashed border: none of it reaches the widget.
    assert await close.evaluate("n => getComputedStyle(n).borderStyle") == "none"
    assert await page.locator("main button").evaluate("n => getComputedStyle(n).borderStyle") == "dashed"

    await page.keyboard.press("Escape")

    await expect(dialog).to_be_hidden()
    await expect(launcher).to_be_focused()
    await expect(launcher).to_have_attribute("aria-expanded", "false")
    assert seen == {"dialogs": [], "errors": []}
    await context.close()


async def test_closed_with_4401_it_fetches_a_new_token_and_resends_the_unacked_message_once(
    live_asgi_url: str, chromium: Any, celery_worker: Any, fake_llm: Any
) -> None:
    fake_llm.enqueue(FakeReply(text="Your order shipped yesterday."))
    context = await chromium.new_context()
    page = await context.new_page()
    seen = _watch(page)
    token_fetches: list[str] = []
    page.on(
        "request",
        lambda request: token_fetches.append(request.url) if "/demo/chat-token" in request.url else None,
    )
    swallowed: list[dict[str, Any]] = []
    connections: list[str] = []

    async def route(ws: WebSocketRoute) -> None:
        connections.append(ws.url)
        server = ws.connect_to_server()
        if len(connections) > 1:
            return  # later connections pass through untouched

        async def first_connection(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame["type"] == "message":  # lost on the way, and the token "expired"
                swallowed.append(frame)
                await ws.close(code=4401, reason="unauthorized")
            else:
                server.send(message)

        ws.on_message(first_connection)

    await page.route_web_socket(re.compile(r"/ws/chat/"), route)
    await _ask_and_see_the_reply(page, live_asgi_url, "Where is my order?", "Your order shipped yesterday.")
    await expect(page.locator(f"{WIDGET} .af-msg--user")).to_have_count(1)
    await expect(page.locator(f"{WIDGET} .af-msg--user .af-state")).to_have_text("")
    assert len(swallowed) == 1 and len(connections) == 2 and len(token_fetches) == 2
    stored = await Message.objects.aget(role="user")
    assert (stored.content, stored.client_message_id) == (
        "Where is my order?",
        swallowed[0]["client_message_id"],
    )
    assert seen == {"dialogs": [], "errors": []}
    await context.close()


MARKDOWN_CASES = {
    "**bold**, *italic* and `x < y`": "<p><strong>bold</strong>, <em>italic</em> and <code>x &lt; y</code></p>",
    "<script>alert(1)</script>": "<p>&lt;script&gt;alert(1)&lt;/script&gt;</p>",
    "<img src=x onerror=alert(1)>": "<p>&lt;img src=x onerror=alert(1)&gt;</p>",
    "&lt;b&gt; stays as typed": "<p>&amp;lt;b&amp;gt; stays as typed</p>",
    "one\ntwo\n\nthree": "<p>one<br>two</p><p>three</p>",
    "- a\n- **b**\n\n1. one\n2. two": "<ul><li>a</li><li><strong>b</strong></li></ul><ol><li>one</li><li>two</li></ol>",
    "3. three\n4. four": '<ol start="3"><li>three</li><li>four</li></ol>',
    "```\n<b>x</b>\n**y**\n```\nafter": "<pre><code>&lt;b&gt;x&lt;/b&gt;\n**y**</code></pre><p>after</p>",
    "[docs](https://example.com/a?b=1&c=2)": (
        '<p><a href="https://example.com/a?b=1&amp;c=2" target="_blank" rel="noopener noreferrer nofollow">'
        "docs</a></p>"
    ),
    "[**x**](http://example.com)": (
        '<p><a href="http://example.com/" target="_blank" rel="noopener noreferrer nofollow">'
        "<strong>x</strong></a></p>"
    ),
    "[a](javascript:alert(1))": "<p>[a](javascript:alert(1))</p>",
    "[a](JaVaScRiPt:alert(1))": "<p>[a](JaVaScRiPt:alert(1))</p>",
    "[a](data:text/html,<b>x</b>)": "<p>[a](data:text/html,&lt;b&gt;x&lt;/b&gt;)</p>",
    "[a](/relative/path)": "<p>[a](/relative/path)</p>",
    # Not a link (a space in the URL); the bare URL in it is one, and the quote cannot leave its href.
    '[a](https://e.com" onclick="alert(1))': (
        '<p>[a](<a href="https://e.com/" target="_blank" rel="noopener noreferrer nofollow">https://e.com</a>'
        '" onclick="alert(1))</p>'
    ),
    "see https://example.com/x.": (
        '<p>see <a href="https://example.com/x" target="_blank" rel="noopener noreferrer nofollow">'
        "https://example.com/x</a>.</p>"
    ),
    "javascript:alert(1)": "<p>javascript:alert(1)</p>",
    "\\*not italic\\* and 2 * 3 * 4": "<p>*not italic* and 2 * 3 * 4</p>",
    "**unclosed": "<p>**unclosed</p>",
}


async def test_the_markdown_renderer_builds_only_the_allowed_elements(
    live_asgi_url: str, chromium: Any
) -> None:
    context = await chromium.new_context()
    page = await context.new_page()
    await page.goto(f"{live_asgi_url}/demo/")

    rendered = await page.evaluate(
        """(cases) => Object.fromEntries(cases.map((text) => {
            const box = document.createElement("div");
            box.appendChild(window.AgentFlowWidget.renderMarkdown(text));
            return [text, box.innerHTML];
        }))""",
        list(MARKDOWN_CASES),
    )

    assert rendered == MARKDOWN_CASES
    await context.close()


class _HostSite:
    """Another site (a different origin: 127.0.0.2) embedding AgentFlow's widget with its own token endpoint."""

    def __init__(self, agentflow_url: str) -> None:
        from conversations.chat_tokens import chat_token_create

        page = (
            f'<!doctype html><html><head><link rel="icon" href="data:,"></head><body><h1>The shop</h1>'
            f'<script src="{agentflow_url}/static/agentflow/widget.js" data-token-url="/chat-token"'
            f' data-title="Shop help" defer></script></body></html>'
        ).encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path == "/chat-token":  # the host backend's endpoint: its own user, its own decision
                    body, kind = (
                        json.dumps({"token": chat_token_create(external_id="shop-alice")}).encode(),
                        "json",
                    )
                else:
                    body, kind = page, "html"
                self.send_response(200)
                self.send_header("Content-Type", f"application/{kind}" if kind == "json" else "text/html")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.url = f"http://127.0.0.2:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def host_site(live_asgi_url: str) -> Iterator[_HostSite]:
    site = _HostSite(live_asgi_url)
    yield site
    site.close()


async def test_on_another_site_the_widget_needs_its_origin_allowed(
    live_asgi_url: str, chromium: Any, celery_worker: Any, fake_llm: Any, host_site: _HostSite, settings: Any
) -> None:
    context = await chromium.new_context()
    page = await context.new_page()
    seen = _watch(page)
    sockets: list[str] = []
    page.on("websocket", lambda ws: sockets.append(ws.url))
    await page.goto(host_site.url)
    await page.get_by_role("button", name=re.compile(r"^Open chat")).click()

    # Not allowed: closed with 4403, and the widget says so instead of retrying.
    await expect(page.get_by_role("status")).to_have_text("Chat is not available on this site.")
    await page.wait_for_timeout(2500)  # longer than the first two reconnect delays
    assert len(sockets) == 1 and sockets[0].startswith(
        live_asgi_url.replace("http://", "ws://") + "/ws/chat/?"
    )

    settings.AGENTFLOW = {**settings.AGENTFLOW, "WIDGET_ORIGINS": [host_site.url]}
    await page.reload()
    await page.get_by_role("button", name=re.compile(r"^Open chat")).click()
    await _send(page, "Hello from the shop")

    await expect(page.locator(f"{WIDGET} .af-msg--assistant .af-body")).to_have_text(
        "Echo: Hello from the shop"
    )
    await expect(page.locator(f"{WIDGET} .af-status")).to_be_empty()
    assert await Message.objects.filter(user__external_id="shop-alice", role="user").acount() == 1
    assert seen == {"dialogs": [], "errors": []}
    await context.close()


async def test_when_the_assistant_fails_retry_sends_the_same_message_again(
    live_asgi_url: str, chromium: Any, celery_worker: Any, fake_llm: Any
) -> None:
    fake_llm.enqueue_error(400, message="prompt is too long")  # not transient: the turn fails at once
    fake_llm.enqueue(FakeReply(text="Second time lucky."))
    context = await chromium.new_context()
    page = await context.new_page()
    seen = _watch(page)
    sent: list[dict[str, Any]] = []
    page.on("websocket", lambda ws: ws.on("framesent", lambda payload: sent.append(json.loads(payload))))
    await _open_demo(page, live_asgi_url)

    await _send(page, "My login is broken")

    failure = page.locator(f"{WIDGET} .af-note--error")
    await expect(failure).to_contain_text("The assistant is unavailable right now.")
    await expect(page.locator(f"{WIDGET} .af-msg--assistant")).to_have_count(0)
    await failure.get_by_role("button", name="Retry").click()

    await expect(page.locator(f"{WIDGET} .af-msg--assistant .af-body")).to_have_text("Second time lucky.")
    await expect(page.locator(f"{WIDGET} .af-msg--assistant")).not_to_have_attribute("data-streaming", "true")
    await expect(failure).to_have_count(0)
    messages = [frame for frame in sent if frame["type"] == "message"]
    assert [frame["message"] for frame in messages] == ["My login is broken"] * 2
    assert messages[0]["client_message_id"] == messages[1]["client_message_id"]
    stored = await Message.objects.aget(role="user")
    assert (stored.status, stored.client_message_id) == ("done", messages[0]["client_message_id"])
    assert await Message.objects.filter(role="assistant", reply_to=stored).acount() == 1
    assert seen == {"dialogs": [], "errors": []}
    await context.close()


async def test_a_widget_with_data_agent_chats_with_that_agent(
    live_asgi_url: str, chromium: Any, celery_worker: Any
) -> None:
    from agentflow import AgentFrameworkBuilder, IntentCategory

    await (
        AgentFrameworkBuilder()
        .with_config({"name": "shop"})
        .with_intent_categories([IntentCategory("ORDER_STATUS", "Order tracking", ["Where is my order"])])
        .build(None)
    )
    page = await chromium.new_page()
    await _open_demo(page, live_asgi_url, "?agent=shop")

    await _send(page, "Where is my order?")
    reply = page.locator(f"{WIDGET} .af-msg--assistant").last
    await expect(reply).to_contain_text("[Offline mode]", timeout=20_000)
    # The text may arrive streamed before the turn is stored as done; the final `turn` frame ends it.
    await expect(reply).not_to_have_attribute("data-streaming", "true")

    message = await Message.objects.select_related("user__agent").aget(role="user")
    assert (message.user.agent.name, message.content, message.status) == (
        "shop",
        "Where is my order?",
        "done",
    )
    assert message.intent == "ORDER_STATUS"
    assert not await EndUser.objects.filter(agent__name="agentflow").aexists()


async def test_a_reply_whose_live_frames_were_lost_is_caught_up_while_the_widget_waits(
    live_asgi_url: str, chromium: Any, celery_worker: Any, fake_llm: Any
) -> None:
    """Every live frame of the first turn (typing, deltas, the turn) is lost on its way: the widget,
    still waiting, resumes after its message (every CATCH_UP_MS) and shows the stored reply."""
    fake_llm.enqueue(FakeReply(text="Your parcel is at the depot."))
    context = await chromium.new_context()
    page = await context.new_page()
    seen = _watch(page)
    dropped: list[str] = []
    resumes: list[Any] = []

    async def route(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def to_server(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame["type"] == "resume":
                resumes.append(frame["after"])
            server.send(message)

        def to_page(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame["type"] in ("typing", "delta", "turn", "thread"):
                dropped.append(frame["type"])
                return
            ws.send(message)

        ws.on_message(to_server)
        server.on_message(to_page)

    await page.route_web_socket(re.compile(r"/ws/chat/"), route)
    await _ask_and_see_the_reply(page, live_asgi_url, "Where is my parcel?", "Your parcel is at the depot.")
    await expect(page.locator(f"{WIDGET} .af-typing")).to_be_hidden()
    stored = await Message.objects.aget(role="user")
    assert "turn" in dropped
    assert str(stored.pk) in resumes  # the catch-up asked for what came after the waiting message
    assert seen == {"dialogs": [], "errors": []}
    await context.close()
