"""The OpenAPI schema tells the truth: schemathesis fuzzes every operation through the ASGI app.

Positive and negative examples (a bounded, derandomized number per operation), authenticated with a
real API key, against the real stack (PostgreSQL, Redis, a Celery worker running the turns). All of
schemathesis's response checks must pass: no 5xx, only declared status codes, bodies matching their
schemas, schema-invalid input refused with a 4xx, schema-valid input accepted, 401 without the key.
"""

from __future__ import annotations

from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode

from agentflow_project.asgi import application

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

EXAMPLES = 30  # per operation and mode: the 9 operations take ~20 s on 2 cores


def _fuzz(operation: Any, mode: GenerationMode, api_key: str) -> None:
    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=EXAMPLES,
        derandomize=True,  # the same examples on every run
        database=None,
        deadline=None,
        suppress_health_check=list(HealthCheck),
    )
    def run(case: Any) -> None:
        wait = case.body.get("wait_seconds") if isinstance(case.body, dict) else None
        if mode == GenerationMode.POSITIVE and isinstance(wait, (int, float)):
            # A valid example may ask for a long wait; 5 s (still valid) is plenty for the worker.
            # (Negative examples are refused before any wait, so they are sent as generated.)
            case.body["wait_seconds"] = min(wait, 5)
        case.call_and_validate(headers={"X-API-Key": api_key})

    run()


# (pytest 9 breaks schemathesis's lazy ``from_fixture`` loader; the schema is loaded inside the test,
# once the test database exists, and each operation is fuzzed with its own Hypothesis run.)
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=str)
def test_every_operation_answers_as_its_schema_says(
    mode: GenerationMode, api_key: str, celery_worker: Any, settings: Any
) -> None:
    # Hundreds of requests from one key and one address: the per-key and per-IP buckets are off here
    # (tests/conversations/test_ratelimit.py covers them).
    limits = {**settings.AGENTFLOW["RATE_LIMITS"], "API_KEY_PER_MINUTE": 0, "IP_PER_MINUTE": 0}
    settings.AGENTFLOW = {**settings.AGENTFLOW, "RATE_LIMITS": limits}
    schema = schemathesis.openapi.from_asgi("/api/openapi.json", application)
    failures: dict[str, str] = {}
    operations = [result.ok() for result in schema.get_all_operations()]

    for operation in operations:
        if mode == GenerationMode.NEGATIVE and operation.label.startswith("GET /api/health"):
            continue  # no parameters and no body: there is nothing to get wrong
        try:
            _fuzz(operation, mode, api_key)
        except Exception as exc:  # collected, so that one run reports every operation that fails
            failures[operation.label] = f"{type(exc).__name__}: {exc}"

    assert (
        len(operations) == 17
    )  # health (3), export, erase, and six routes each on the default and per-agent paths
    assert failures == {}
