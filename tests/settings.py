"""Settings for the test suite: the project's settings under a deterministic, isolated environment.

The environment is set here (not in conftest.py) because pytest-django loads the settings before
any conftest runs.
"""

import os
import uuid

_RUN = os.environ.get("AGENTFLOW_TEST_RUN") or uuid.uuid4().hex[:8]
for _var in [v for v in os.environ if v.startswith("AGENT_")]:
    del os.environ[_var]
for _var in (
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "AGENTFLOW_CONFIG",
    "AGENTFLOW_AGENT_FACTORY",
    "AGENTFLOW_AGENTS",
    "AGENTFLOW_DEFAULT_AGENT",
):
    os.environ.pop(_var, None)
os.environ.update(
    {
        "AGENTFLOW_TEST_RUN": _RUN,
        "AGENTFLOW_SKIP_DOTENV": "1",
        "DJANGO_SECRET_KEY": "test-secret-key-not-for-production-0123456789",
        "DJANGO_DEBUG": "false",
        "ALLOWED_HOSTS": "testserver,localhost,127.0.0.1",
        "AGENTFLOW_CELERY_QUEUE": f"agentflow-test-{_RUN}",
        "AGENTFLOW_CHANNELS_PREFIX": f"agentflow-test-{_RUN}",
        "AGENTFLOW_CACHE_PREFIX": f"agentflow-test-{_RUN}",
        "AGENTFLOW_REST_WAIT_SECONDS": "20",
        # The demo page is off unless DEBUG; the widget tests use it.
        "AGENTFLOW_DEMO_PAGE": "true",
    }
)
# The reference (fp32) encoder: the default's integer graph computes on the CPU's own integer kernels
# (VNNI, or AVX2's saturating ones), so a sentence near a decision boundary may fall either side
# depending on the machine. The tests pin decisions, not kernels; tests/agentflow/test_embeddings_quantized.py
# cover the integer graph itself.
os.environ.setdefault("AGENTFLOW_EMBEDDER", "minilm-fp32")

from agentflow_project.settings import *  # noqa: E402, F403

# Each run has its own test database, so concurrent runs on one server never drop each other's.
DATABASES["default"]["TEST"] = {"NAME": f"test_agentflow_{_RUN}"}  # noqa: F405

# Follow-up jobs (memory writing) are off unless a test turns them on: one left running in the worker
# would race the next test's database reset.
AGENTFLOW = {**AGENTFLOW, "BACKGROUND_JOBS": False}  # noqa: F405

PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast logins in admin tests
