"""``agentflow.hoptrace``: per-hop lines of a turn, written only when asked for."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentflow import hoptrace


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    hoptrace.configure(None)  # back to the environment's word (unset in the tests)


def _lines(folder: Path) -> list[list[str]]:
    return [line.split() for path in sorted(folder.glob("*.log")) for line in path.read_text().splitlines()]


def test_nothing_is_written_unless_a_folder_is_given(tmp_path: Path) -> None:
    hoptrace.configure("")
    hoptrace.mark("m-1", "k_start")

    assert not hoptrace.tracing()
    assert list(tmp_path.iterdir()) == []


def test_each_hop_is_a_line_with_its_key_name_and_time(tmp_path: Path) -> None:
    hoptrace.configure(str(tmp_path))
    hoptrace.mark("m-1", "k_start")
    hoptrace.mark("m-1", "k_turned")

    lines = _lines(tmp_path)
    assert hoptrace.tracing()
    assert [(key, hop) for key, hop, _, _ in lines] == [("m-1", "k_start"), ("m-1", "k_turned")]
    assert float(lines[0][2]) <= float(lines[1][2])


def test_threads_write_whole_lines(tmp_path: Path) -> None:
    hoptrace.configure(str(tmp_path))

    def hops(n: int) -> None:
        for i in range(200):
            hoptrace.mark(f"t{n}-{i}", "k_recv")

    threads = [threading.Thread(target=hops, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    lines = _lines(tmp_path)
    assert len(lines) == 1600
    assert {len(line) for line in lines} == {4}
    assert len({key for key, _, _, _ in lines}) == 1600


def test_the_environment_is_read_at_the_first_hop(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENTFLOW_HOP_TRACE", str(tmp_path))
    hoptrace.configure(None)

    hoptrace.mark("m-2", "w_queued")

    assert [(key, hop) for key, hop, _, _ in _lines(tmp_path)] == [("m-2", "w_queued")]
