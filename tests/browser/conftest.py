"""Real-browser tests: the project's ASGI app served by daphne over TCP, driven by headless Chromium.

Daphne runs in a thread of this process, so it serves the test database and the test settings
(the fake LLM's address, this run's Celery queue and channel-layer prefix) exactly as the other
tests see them. Chromium is Debian's ``/usr/bin/chromium`` (``make test`` installs it), driven by
Python Playwright; no browser is ever downloaded.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from playwright.async_api import expect

CHROMIUM = os.environ.get("AGENTFLOW_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]


DAPHNE_THREAD = "daphne"


class _DaphneThreadLayers:
    """Channel layers of its own for the daphne thread; every other thread gets the usual shared ones.

    A channels-redis layer keeps the state of ``receive()`` for one event loop at a time. Daphne's
    loop lives for the whole session in its thread, so sharing the process's layer with it would let
    a consumer still receiving there (a page closing) break a later test receiving in its own loop.
    """

    def __init__(self, shared: Any) -> None:
        self.shared = shared
        self.own: dict[str, Any] = {}

    def __getitem__(self, alias: str) -> Any:
        if threading.current_thread().name != DAPHNE_THREAD:
            return self.shared[alias]
        if alias not in self.own:
            self.own[alias] = self.shared.make_backend(alias)
        return self.own[alias]


# The one daphne of this process: a Twisted reactor runs once per process and cannot be restarted.
_live: dict[str, Any] = {}


def _daphne_start() -> dict[str, Any]:
    import channels.layers
    from daphne.endpoints import build_endpoint_description_strings
    from daphne.server import Server

    from agentflow_project.asgi import application

    shared_layers = channels.layers.channel_layers
    channels.layers.channel_layers = _DaphneThreadLayers(shared_layers)
    server = Server(
        application=application,
        endpoints=build_endpoint_description_strings(host="127.0.0.1", port=0),
        signal_handlers=False,  # not the main thread
        verbosity=0,
    )
    thread = threading.Thread(target=server.run, name=DAPHNE_THREAD, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.listening_addresses:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("daphne did not start listening within 15 s")
        time.sleep(0.05)
    host, port = server.listening_addresses[0]
    return {"url": f"http://{host}:{port}", "thread": thread, "shared_layers": shared_layers, "users": 0}


def _daphne_stop(live: dict[str, Any]) -> None:
    import channels.layers
    from daphne.server import reactor

    reactor.callFromThread(reactor.stop)
    live["thread"].join(timeout=10)
    channels.layers.channel_layers = live["shared_layers"]


@pytest.fixture(scope="session")
def live_asgi_url(django_db_setup: Any) -> Iterator[str]:
    """The base URL (``http://127.0.0.1:<port>``) of daphne serving ``agentflow_project.asgi``.

    Other test modules may import this fixture; however many modules use it, one server runs.
    """
    if not _live:
        _live.update(_daphne_start())
    _live["users"] += 1
    yield _live["url"]
    _live["users"] -= 1
    if not _live["users"]:
        _daphne_stop(_live)


@pytest.fixture
async def chromium() -> AsyncIterator[Any]:
    """Headless Chromium. Missing Chromium fails the test: a skipped browser test proves nothing.

    The async API: the sync one keeps an event loop running in the test's thread, where Django then
    refuses the ORM calls of the test and of the database teardown.
    """
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"Chromium is not installed at {CHROMIUM}. The browser tests need Debian's chromium: run "
            "`make test` (it installs it with .ci/ensure-chromium) or `apt-get install -y chromium`.",
            pytrace=False,
        )
    from playwright.async_api import async_playwright

    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        await browser.close()


EXPECT_TIMEOUT_MS = 30_000  # a shared 2-core machine: the default 5 s flaked under load


@pytest.fixture(autouse=True)
def _expect_timeout() -> None:
    expect.set_options(timeout=EXPECT_TIMEOUT_MS)


@pytest.fixture
def staff(django_user_model: Any) -> Any:
    """A superuser for the console pages (the inbox greets her by name)."""
    return django_user_model.objects.create_superuser(
        "ops", "ops@example.com", "ops-password-123", first_name="Dana"
    )
