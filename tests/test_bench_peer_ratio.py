"""bench/peer_ratio.py's command line and its --baseline arithmetic (the loads themselves are benches).

Run in subprocesses: importing the bench sets environment variables for the processes it starts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench" / "peer_ratio.py"


def run_bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=120)


def test_a_baseline_that_is_not_a_checkout_is_refused_before_any_load_runs(tmp_path):
    (tmp_path / "agentflow").mkdir()  # looks like a checkout, but has no .venv
    for path in (tmp_path, tmp_path / "missing"):
        out = run_bench("--loads", "A", "--baseline", str(path))
        assert out.returncode == 2, out.stderr
        assert "not an AgentFlow checkout with a .venv (run make install there)" in out.stderr
        assert "load A" not in out.stdout


def test_an_unknown_load_is_refused():
    out = run_bench("--loads", "A,Z")
    assert out.returncode == 2
    assert "unknown load(s) ['Z']; choose from A, B, C" in out.stderr


def baseline_row(load: str, cpu_now: float, baseline_cpus: list[float], commit: str) -> tuple[dict, str]:
    code = (
        "import json, sys; sys.argv = ['peer_ratio.py']; import peer_ratio as p\n"
        f"row = {{'agentflow_cpu_ms_per_turn': {cpu_now}}}\n"
        "runs = [{'turns_per_s': 7.0, 'cpu_ms_per_turn': {'driver': c, 'postgres': 0.0, 'fake_llm': 0.0}}"
        f" for c in {baseline_cpus!r}]\n"
        f"text = p.baseline_text({load!r}, row, runs, {commit!r})\n"
        "print(json.dumps([row, text]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=BENCH.parent, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    row, text = json.loads(out.stdout.splitlines()[-1])
    return row, text


def test_against_the_issues_commit_the_target_is_put_on_this_machines_scale():
    # The issue's code took 33.8 ms a turn at load A on the issue's machine; here, a median of 101.4
    # (three runs): this machine runs it 3x slower, so the 12 ms target is 36 ms here.
    row, text = baseline_row("A", 38.0, [90.0, 101.4, 120.0], "45eb78c")
    assert row["baseline_cpu_ms_per_turn"] == 101.4
    assert abs(row["machine_scale"] - 3.0) < 1e-9
    assert abs(row["target_here_ms"] - 36.0) < 1e-9
    assert abs(row["cpu_of_baseline"] - 38.0 / 101.4) < 1e-9
    assert "this code uses 0.375 of its CPU a turn (the issue's target: 0.355)" in text
    assert "<= 12 ms there is <= 36.0 ms here" in text


def test_another_baseline_gets_the_ratio_only():
    row, text = baseline_row("B", 30.0, [60.0], "0123abc")
    assert row["cpu_of_baseline"] == 0.5
    assert "machine_scale" not in row and "target_here_ms" not in row
    assert text == "baseline 0123abc: 7.0 turns/s, 60.0 CPU ms/turn; this code uses 0.500 of its CPU a turn"
