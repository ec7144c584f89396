"""`manage.py agentflow_run` as an operator runs it: a real daphne and a real Celery worker (with its
embedded beat) as child processes, on a port and a turn queue of their own, against the test database.

The worker is killed with SIGKILL and must come back while the web server keeps answering; SIGTERM
must drain the turn in flight, kill what outlives the drain bound, exit 0 and leave no process behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from django.core.exceptions import ImproperlyConfigured
from django.core.management import CommandError, call_command

from agentflow.testing.fake_anthropic import FakeAnthropicServer
from agentflow_project import runtime
from agentflow_project.runtime import redacted_url
from conversations.models import Message
from tests.faults import unused_port

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

ROOT = Path(__file__).resolve().parents[1]
STARTUP_SECONDS = 60  # the bound on waits for the children to come up (loaded CI machines are slow)


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, process group) of ``pid``, or None when it is gone (or a zombie)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = text.rsplit(")", 1)[1].split()
    if fields[0] == "Z":
        return None
    return int(fields[1]), int(fields[2])


def _processes() -> dict[int, tuple[int, int]]:
    found = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            found[int(entry.name)] = stat
    return found


def _descendants(pid: int) -> set[int]:
    processes = _processes()
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, (parent, _) in processes.items() if parent in frontier} - found
        found |= frontier
    return found


def _child(pid: int, word: str) -> int | None:
    """The child of ``pid`` whose command line contains ``word`` (``"celery"``, ``"daphne"``)."""
    for child, (parent, _) in _processes().items():
        if parent != pid:
            continue
        try:
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
        except FileNotFoundError:
            continue
        if word.encode() in argv:
            return child
    return None


def _get(port: int, path: str) -> tuple[int | None, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"null")
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return None, None


def _until(what: str, check: Callable[[], Any], *, seconds: float = STARTUP_SECONDS) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(0.2)
    pytest.fail(f"{what}: not within {seconds} s")


class Run:
    """One ``agentflow_run`` process and its combined output."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path, queue: str) -> None:
        self.process, self.port, self.log, self.queue = process, port, log, queue

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def ready(self) -> int:
        """Wait until the readiness probe sees every component (the worker's heartbeat included)."""
        _until("GET /api/health/ready answering 200", lambda: _get(self.port, "/api/health/ready")[0] == 200)
        return _until("the worker child", lambda: _child(self.process.pid, "celery"))


@pytest.fixture
def agentflow_run(settings: Any, tmp_path: Path) -> Iterator[Callable[..., Run]]:
    runs: list[Run] = []

    def start(**extra_env: str) -> Run:
        db = settings.DATABASES["default"]
        port = unused_port()
        queue = f"agentflow-run-test-{uuid.uuid4().hex[:8]}"
        env = {
            **os.environ,
            "AGENTFLOW_WORKER_CONCURRENCY": "2",  # --concurrency's default
            "AGENTFLOW_WORKER_PROCESSES": "1",  # --workers' default (one per usable core otherwise)
            "DJANGO_SETTINGS_MODULE": "agentflow_project.settings",
            "DATABASE_URL": f"postgresql://{db['USER']}:@/{db['NAME']}?host={db['HOST']}",
            "REDIS_URL": settings.REDIS_URL,
            "AGENTFLOW_CELERY_QUEUE": queue,
            "AGENTFLOW_DATA_DIR": str(tmp_path),  # the beat's schedule file
            "AGENTFLOW_AUTO_MIGRATE": "false",
            "AGENTFLOW_WORKER_HEARTBEAT_SECONDS": "1",
            "DJANGO_DEBUG": "true",
            **extra_env,
        }
        log = tmp_path / f"agentflow_run-{len(runs)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                # --keep-services: the suite's PostgreSQL and Redis stay up
                [sys.executable, "manage.py", "agentflow_run", "--port", str(port), "--keep-services"],
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        runs.append(Run(process, port, log, queue))
        return runs[-1]

    yield start
    for run in runs:  # a failed test leaves nothing running
        left = _descendants(run.process.pid)
        for pid in left | {run.process.pid}:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        run.process.wait()
        client = redis.Redis.from_url(settings.REDIS_URL)  # the run's queue, bindings and heartbeats go too
        try:
            client.delete(
                run.queue,
                f"_kombu.binding.{run.queue}",
                f"_kombu.binding_permanent.{run.queue}",
                f"agentflow:health:workers:{run.queue}",
            )
        finally:
            client.close()


def _newest_heartbeat(settings: Any, queue: str) -> float:
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        newest = client.zrevrange(f"agentflow:health:workers:{queue}", 0, 0, withscores=True)
        return float(newest[0][1]) if newest else 0.0
    finally:
        client.close()


def _redis_now(settings: Any) -> float:
    client = redis.Redis.from_url(settings.REDIS_URL)
    try:
        seconds, micros = client.time()
        return seconds + micros / 1_000_000
    finally:
        client.close()


def test_a_killed_worker_is_restarted_while_the_web_server_keeps_answering(
    agentflow_run: Callable[..., Run], settings: Any
) -> None:
    run = agentflow_run()
    worker = run.ready()
    daphne = _child(run.process.pid, "daphne")
    assert daphne is not None
    beat_group = {pid for pid, (_, group) in _processes().items() if group == worker}
    assert len(beat_group) >= 2  # the worker and its embedded beat, in the worker's own process group
    killed_at = _redis_now(settings)

    os.kill(worker, signal.SIGKILL)
    live: list[int | None] = []

    def restarted() -> int | None:
        live.append(_get(run.port, "/api/health/live")[0])
        new = _child(run.process.pid, "celery")
        return (
            new if new not in (None, worker) and _newest_heartbeat(settings, run.queue) > killed_at else None
        )

    new_worker = _until("a new worker with a fresh heartbeat", restarted)

    assert set(live) == {200}  # the web server answered all along
    assert _child(run.process.pid, "daphne") == daphne  # and was never restarted
    assert run.process.poll() is None
    assert not {pid for pid, (_, group) in _processes().items() if group == worker}  # no orphaned beat
    output = run.output()
    assert "the worker (celery) exited unexpectedly (exit code -9 (SIGKILL))" in output
    assert f"restarted the worker (celery) (pid {new_worker})" in output
    assert _get(run.port, "/api/health/ready")[0] == 200


def _children(pid: int, word: str) -> dict[int, list[bytes]]:
    """The children of ``pid`` whose command line contains ``word``, with their command lines."""
    found = {}
    for child, (parent, _) in _processes().items():
        if parent == pid:
            try:
                argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            except FileNotFoundError:
                continue
            if word.encode() in argv:
                found[child] = argv
    return found


def test_several_worker_processes_run_one_beat_share_the_connections_and_each_comes_back(
    agentflow_run: Callable[..., Run], settings: Any
) -> None:
    """A worker process uses at most one core (the GIL): AGENTFLOW_WORKER_PROCESSES=2 starts two, with
    their own node names, the periodic jobs in the first only, and pools that fit the connections."""
    run = agentflow_run(AGENTFLOW_WORKER_PROCESSES="2")
    run.ready()
    workers = _until(
        "two worker children", lambda: (w := _children(run.process.pid, "celery")) and len(w) == 2 and w
    )
    by_name = {argv[argv.index(b"-n") + 1]: pid for pid, argv in workers.items()}
    assert set(by_name) == {b"worker1@%h", b"worker2@%h"}
    beats = {name: b"-B" in workers[pid] for name, pid in by_name.items()}
    assert beats == {b"worker1@%h": True, b"worker2@%h": False}
    pools = {name: Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") for name, pid in by_name.items()}
    # 2 threads each: the pool one worker would have (2 + 4), which fits the budget beside the web's.
    assert all(b"AGENTFLOW_DB_POOL_MAX=6" in env for env in pools.values())

    second = by_name[b"worker2@%h"]
    os.kill(second, signal.SIGKILL)

    def back() -> int | None:
        now = {argv[argv.index(b"-n") + 1]: pid for pid, argv in _children(run.process.pid, "celery").items()}
        new = now.get(b"worker2@%h")
        return new if new not in (None, second) else None

    new_second = _until("the second worker restarted", back)
    assert _children(run.process.pid, "celery").keys() == {by_name[b"worker1@%h"], new_second}
    assert f"restarted the worker 2 (celery) (pid {new_second})" in run.output()


def test_startup_says_what_it_uses_once_and_django_warnings_print_once(
    agentflow_run: Callable[..., Run], settings: Any
) -> None:
    run = agentflow_run()
    run.ready()
    db = settings.DATABASES["default"]

    with pytest.raises(urllib.error.HTTPError) as missing:  # Django logs a warning for it
        urllib.request.urlopen(f"http://127.0.0.1:{run.port}/no-such-page", timeout=5)
    assert missing.value.code == 404
    _until("the 404 warning", lambda: "Not Found: /no-such-page" in run.output())
    output = run.output()

    database = f"agentflow_run: database: PostgreSQL {db['USER']}@{db['HOST']}/{db['NAME']} (DATABASE_URL)"
    redis_line = f"agentflow_run: redis: {redacted_url(settings.REDIS_URL)} (REDIS_URL)"
    llm = "agentflow_run: LLM: OFFLINE (no ANTHROPIC_API_KEY): replies say so and offer a human"
    for line in (database, redis_line, llm):
        assert output.count(line) == 1, line
    assert output.count("Not Found: /no-such-page") == 1


def test_sigterm_drains_the_turn_in_flight_and_exits_0_leaving_no_process(
    agentflow_run: Callable[..., Run], fake_llm: FakeAnthropicServer, api_key: str
) -> None:
    fake_llm.latency = 3.0
    run = agentflow_run(AGENTFLOW_DRAIN_SECONDS="30")
    run.ready()
    request = urllib.request.Request(
        f"http://127.0.0.1:{run.port}/api/users/drain/messages",
        data=json.dumps({"message": "finish me before you stop", "wait_seconds": 0}).encode(),
        headers={"X-API-Key": api_key, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        accepted = json.loads(response.read())
    _until("the turn's first LLM call", lambda: fake_llm.requests)  # the turn is in flight
    children = _descendants(run.process.pid)

    run.process.send_signal(signal.SIGTERM)
    code = run.process.wait(timeout=30 + 15)

    assert code == 0
    message = Message.objects.get(pk=accepted["message_id"])
    assert message.status == Message.Status.DONE
    assert message.reply.content == "Echo: finish me before you stop"
    assert not {pid for pid in children if _stat(pid) is not None}
    assert "did not stop within" not in run.output()


def test_sigterm_kills_what_outlives_the_drain_bound_and_exits_0(
    agentflow_run: Callable[..., Run], fake_llm: FakeAnthropicServer, api_key: str
) -> None:
    fake_llm.latency = 60.0  # a turn far longer than the drain bound
    run = agentflow_run(AGENTFLOW_DRAIN_SECONDS="2")
    run.ready()
    request = urllib.request.Request(
        f"http://127.0.0.1:{run.port}/api/users/stuck/messages",
        data=json.dumps({"message": "never finished", "wait_seconds": 0}).encode(),
        headers={"X-API-Key": api_key, "Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30):
        pass
    _until("the turn's first LLM call", lambda: fake_llm.requests)
    children = _descendants(run.process.pid)

    run.process.send_signal(signal.SIGTERM)
    code = run.process.wait(timeout=2 + 15)

    assert code == 0
    assert not {pid for pid in children if _stat(pid) is not None}
    assert "the worker (celery) did not stop within 2 s; killing it" in run.output()


def test_the_web_command_gives_websocket_handshakes_longer_than_daphnes_5_seconds() -> None:
    # Under a burst of connections on a busy machine, handshakes dropped at daphne's default 5 s were
    # retried by their clients while the dropped ones' work went on (bench/production_load.py).
    from daphne.cli import CommandLineInterface

    from agentflow_project import runtime

    command = runtime.web_command(port=8123)
    parsed = CommandLineInterface().parser.parse_args(command[3:])

    assert parsed.websocket_connect_timeout == runtime.WEBSOCKET_HANDSHAKE_SECONDS >= 30
    assert parsed.application == "agentflow_project.asgi:application"


# --- how many workers and threads by default --------------------------------------------------------


@pytest.mark.parametrize(("cores", "expected"), [(1, 1), (2, 2), (3, 3), (8, 4), (64, 4)])
def test_worker_processes_default_to_one_per_usable_core_up_to_four(
    monkeypatch: pytest.MonkeyPatch, cores: int, expected: int
) -> None:
    monkeypatch.delenv("AGENTFLOW_WORKER_PROCESSES", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)))

    assert runtime.worker_processes() == expected
    monkeypatch.setenv("AGENTFLOW_WORKER_PROCESSES", "3")
    assert runtime.worker_processes() == 3


def test_worker_threads_default_to_128_and_allow_up_to_512(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AGENTFLOW_WORKER_CONCURRENCY", raising=False)
    assert runtime.worker_concurrency() == 128
    monkeypatch.setenv("AGENTFLOW_WORKER_CONCURRENCY", "512")
    assert runtime.worker_concurrency() == 512


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("AGENTFLOW_WORKER_PROCESSES", "0", "AGENTFLOW_WORKER_PROCESSES must be at least 1; got 0"),
        ("AGENTFLOW_WORKER_PROCESSES", "17", "AGENTFLOW_WORKER_PROCESSES must be at most 16; got 17"),
        ("AGENTFLOW_WORKER_PROCESSES", "two", "AGENTFLOW_WORKER_PROCESSES must be a whole number; got .two."),
        ("AGENTFLOW_WORKER_CONCURRENCY", "513", "AGENTFLOW_WORKER_CONCURRENCY must be at most 512; got 513"),
    ],
)
def test_bad_worker_sizes_are_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, message: str
) -> None:
    monkeypatch.setenv(name, value)
    read = runtime.worker_processes if name.endswith("PROCESSES") else runtime.worker_concurrency

    with pytest.raises(ImproperlyConfigured, match=message):
        read()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--concurrency", "0"], "--concurrency must be from 1 to 512; got 0"),
        (["--concurrency", "513"], "--concurrency must be from 1 to 512; got 513"),
    ],
)
def test_bad_thread_counts_stop_the_runner_before_anything_starts(option: list[str], message: str) -> None:
    with pytest.raises(CommandError, match=message):
        call_command("agentflow_run", *option)
