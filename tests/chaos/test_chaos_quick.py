"""The chaos suite's quick subset: a worker killed mid-turn, then Redis down for 8 s, with 4 users.

It runs the driver (``python -m tests.chaos.run``) as a separate process: the driver starts a stack
of its own (PostgreSQL, Valkey, the fake LLM, daphne and a Celery worker) under ``.data/chaos/`` and
stops it at the end. The whole suite (six scenarios) runs with ``make chaos``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.chaos.run import Row

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(240)
def test_no_message_is_lost_duplicated_or_stuck_when_the_worker_and_redis_fail(tmp_path):
    out = tmp_path / "rows.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DJANGO_", "AGENTFLOW_", "PYTEST_"))}
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tests.chaos.run",
            "--scenario",
            "worker-kill,redis-8s",
            "--users",
            "4",
            "--seconds",
            "8",
            "--after",
            "4",
            "--turn-limit",
            "10",
            "--json",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
        check=False,
    )
    assert out.exists(), done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())

    assert [r["scenario"] for r in rows] == ["worker-kill", "redis-8s"]
    for raw in rows:
        row = Row(**{k: v for k, v in raw.items() if k != "ok"})
        assert row.accepted > 0, raw
        assert (row.lost, row.duplicated, row.stuck, row.untold) == (0, 0, 0, 0), raw
        assert row.stored >= row.accepted, raw
        assert row.answered + row.held + row.failed == row.stored, raw
        assert row.worker_alive, raw
        assert row.recover_s is not None and row.recover_s <= 30, raw
    assert done.returncode == 0, done.stdout[-3000:]
