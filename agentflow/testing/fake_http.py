"""A scripted HTTP server on loopback for tests of outgoing integrations (Slack webhooks, Jira).

    with FakeHTTPServer() as server:
        server.enqueue(500)                               # the first request gets a 500
        server.enqueue(201, {"key": "SUP-1"})             # the second a 201 with a JSON body
        ...  post to server.url("/rest/api/2/issue")
        server.requests  # [{"method", "path", "headers", "body", "json"}, ...]

Unscripted requests get ``default`` (200 ``ok``). A response may carry headers (``Retry-After``).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class FakeResponse:
    status: int = 200
    body: Any = "ok"  # a str is sent as is, anything else as JSON
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (a slow server, for timeouts)


class FakeHTTPServer:
    """Records every request and answers from a script of responses."""

    def __init__(self, default: FakeResponse | None = None) -> None:
        self.default = default or FakeResponse()
        self._script: deque[FakeResponse] = deque()
        self._lock = threading.Lock()
        self._requests: list[dict[str, Any]] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="fake-http", daemon=True)
        self._released = threading.Event()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length).decode("utf-8", "replace")
                try:
                    parsed = json.loads(raw)
                except ValueError:
                    parsed = None
                with fake._lock:
                    fake._requests.append(
                        {
                            "method": "POST",
                            "path": self.path,
                            "headers": {k.lower(): v for k, v in self.headers.items()},
                            "body": raw,
                            "json": parsed,
                        }
                    )
                    response = fake._script.popleft() if fake._script else fake.default
                if response.delay:
                    fake._released.wait(response.delay)
                body = response.body if isinstance(response.body, str) else json.dumps(response.body)
                data = body.encode()
                self.send_response(response.status)
                self.send_header(
                    "Content-Type", "text/plain" if isinstance(response.body, str) else "application/json"
                )
                self.send_header("Content-Length", str(len(data)))
                for name, value in response.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        return Handler

    def start(self) -> FakeHTTPServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._released.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def __enter__(self) -> FakeHTTPServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def url(self, path: str = "") -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}{path}"

    def enqueue(
        self, status: int = 200, body: Any = "ok", headers: dict[str, str] | None = None, delay: float = 0.0
    ) -> None:
        with self._lock:
            self._script.append(FakeResponse(status, body, headers or {}, delay))

    @property
    def requests(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._requests)

    def reset(self) -> None:
        with self._lock:
            self._script.clear()
            self._requests.clear()
