"""Separate hosts on one machine: Linux network namespaces on one bridge, joined by veth links.

Each host is a network namespace ``afso-<pid>-<host>`` with one interface, ``eth0``, at
``10.213.0.<n>/24``. The bridge is in a namespace of its own (``afso-<pid>-lan``), so the machine's
own namespace gets no address, link or route: the hosts reach each other and nothing else, and
nothing outside reaches them. Names carry the test process's pid, so several runs never collide and
``sweep_leftovers`` can tell a dead run's namespaces from a live one's.

Processes run on a host with ``ip netns exec``. The test process itself takes part as a client:
a thread that calls ``Lan.enter`` moves into a host's namespace (``setns`` affects only the calling
thread), and the sockets it opens, and the threads it starts, belong to that host.

Needs root (``CAP_SYS_ADMIN`` and ``CAP_NET_ADMIN``) and iproute2's ``ip``.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

PREFIX = "afso"  # "agentflow scale-out": every namespace this module creates starts with it
SUBNET = "10.213.0"
PREFIX_LENGTH = 24
CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


class LanUnavailable(RuntimeError):
    """This machine or user cannot create network namespaces (the reason is the message)."""


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, ["ip", *args], done.stdout, done.stderr)
    return done.stdout


def namespaces() -> list[str]:
    """The names of the network namespaces ``ip netns`` knows."""
    return [line.split()[0] for line in _ip("netns", "list").splitlines() if line.strip()]


def unavailable_reason() -> str | None:
    """Why this process cannot build a LAN of namespaces here, or None when it can (it tries one)."""
    if os.geteuid() != 0:
        return f"network namespaces need root; running as uid {os.geteuid()}"
    for tool, package in (("ip", "iproute2"), ("setpriv", "util-linux")):
        if shutil.which(tool) is None:
            return f"`{tool}` ({package}) is not installed"
    probe = f"{PREFIX}-{os.getpid()}-probe"
    try:
        _ip("netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return f"`ip netns add` is not permitted here: {exc.stderr.strip() or exc}"
    try:
        _ip("-n", probe, "link", "add", "br0", "type", "bridge")
        _ip("link", "add", "eth0", "netns", probe, "type", "veth", "peer", "name", "peer0", "netns", probe)
    except subprocess.CalledProcessError as exc:
        return f"cannot create a bridge or veth link in a namespace: {exc.stderr.strip() or exc}"
    finally:
        _ip("netns", "del", probe)
    return None


def _kill_all(namespace: str, grace: float) -> None:
    """End every process still running in ``namespace`` (all were started there by this module)."""
    try:
        pids = [int(pid) for pid in _ip("netns", "pids", namespace).split()]
    except subprocess.CalledProcessError:
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return not Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def sweep_leftovers() -> list[str]:
    """Delete the namespaces of earlier runs whose test process is gone (a run killed mid-way).

    Only names ``afso-<pid>-...`` whose pid is no longer alive; a live run's namespaces stay.
    """
    removed = []
    for name in namespaces():
        parts = name.split("-")
        if len(parts) < 3 or parts[0] != PREFIX or not parts[1].isdigit():
            continue
        if int(parts[1]) == os.getpid() or _alive(int(parts[1])):
            continue
        _kill_all(name, grace=1.0)
        try:
            _ip("netns", "del", name)
            removed.append(name)
        except subprocess.CalledProcessError:
            pass
    return removed


@dataclass(frozen=True)
class Host:
    name: str
    namespace: str
    address: str


class Lan:
    """A bridge and the hosts on it; ``close()`` removes every process, link and namespace it made."""

    def __init__(self) -> None:
        self.run = f"{PREFIX}-{os.getpid()}"
        self.hosts: dict[str, Host] = {}
        self.processes: list[tuple[subprocess.Popen[bytes], signal.Signals]] = []
        self._namespaces: list[str] = []
        try:
            self.bridge_namespace = self._add_namespace("lan")
            _ip("-n", self.bridge_namespace, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_namespace, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _add_namespace(self, name: str) -> str:
        namespace = f"{self.run}-{name}"
        _ip("netns", "add", namespace)
        self._namespaces.append(namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        return namespace

    def add_host(self, name: str, number: int) -> Host:
        """A host ``name`` at ``10.213.0.<number>``, linked to the bridge by a veth pair."""
        if len(name) > 15 or name in self.hosts or name == "br0":
            raise ValueError(f"bad host name {name!r} (unique, at most 15 characters)")
        namespace = self._add_namespace(name)
        address = f"{SUBNET}.{number}"
        # Both ends are created straight inside their namespaces: nothing appears in the machine's own.
        _ip(
            "link", "add", "eth0", "netns", namespace, "type", "veth",
            "peer", "name", name, "netns", self.bridge_namespace,
        )  # fmt: skip
        _ip("-n", self.bridge_namespace, "link", "set", name, "master", "br0")
        _ip("-n", self.bridge_namespace, "link", "set", name, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/{PREFIX_LENGTH}", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        host = Host(name, namespace, address)
        self.hosts[name] = host
        return host

    def argv(self, host: Host, command: Sequence[str], *, user: str | None = None) -> list[str]:
        """``command`` run on ``host`` (as ``user``: setpriv drops root after entering the namespace)."""
        prefix = ["ip", "netns", "exec", host.namespace]
        if user is not None:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={user}", "--init-groups"]
        return [*prefix, *command]

    def start(
        self,
        host: Host,
        command: Sequence[str],
        *,
        env: Mapping[str, str],
        log: Path,
        cwd: Path | None = None,
        user: str | None = None,
        stop_signal: signal.Signals = signal.SIGTERM,
    ) -> subprocess.Popen[bytes]:
        """Start ``command`` on ``host`` in the background, its output going to ``log``.

        It gets a process group of its own, which ``close()`` sends ``stop_signal``, then SIGKILL.
        """
        with log.open("ab") as out:
            process = subprocess.Popen(
                self.argv(host, command, user=user),
                env=dict(env),
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append((process, stop_signal))
        return process

    @staticmethod
    def enter(host: Host) -> None:
        """Move the calling thread into ``host``'s network namespace for good (a pool's initializer)."""
        fd = os.open(f"/run/netns/{host.namespace}", os.O_RDONLY)
        try:
            if _libc.setns(fd, CLONE_NEWNET) != 0:
                errno = ctypes.get_errno()
                raise OSError(errno, f"setns into {host.namespace}: {os.strerror(errno)}")
        finally:
            os.close(fd)

    @contextmanager
    def inside(self, host: Host) -> Iterator[None]:
        """Run the block on ``host``: sockets opened (and threads started) in it stay there."""
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            self.enter(host)
            try:
                yield
            finally:
                if _libc.setns(own, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns back to the thread's own namespace")
        finally:
            os.close(own)

    def close(self) -> None:
        """Stop every process (its stop signal, then KILL), delete the veth links, then the namespaces."""
        for process, stop_signal in reversed(self.processes):
            if process.poll() is None:
                try:
                    os.killpg(process.pid, stop_signal)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + 5
        for process, _ in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                process.wait(timeout=10)
        for namespace in self._namespaces:
            _kill_all(namespace, grace=2.0)  # what a process forked (PostgreSQL's backends)
        for host in self.hosts.values():
            try:  # deleting one end of a veth pair deletes both
                _ip("-n", self.bridge_namespace, "link", "del", host.name)
            except subprocess.CalledProcessError:
                pass
        for namespace in reversed(self._namespaces):
            try:
                _ip("netns", "del", namespace)
            except subprocess.CalledProcessError:
                pass
        self._namespaces.clear()
