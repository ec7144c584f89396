"""Reads of intent categories."""

from __future__ import annotations

from agentflow.types import IntentCategory as IntentCategorySpec

from .models import IntentCategory


def intent_categories_active(*, agent_id: int) -> list[IntentCategorySpec]:
    """The agent's active categories, as the public value type."""
    return [
        IntentCategorySpec(
            c.name,
            c.description,
            c.examples,
            threshold=c.threshold,
            handoff=c.handoff,
            on_low_confidence=c.on_low_confidence,
            system_prompt=c.system_prompt,
        )
        for c in IntentCategory.objects.filter(agent_id=agent_id, active=True).order_by("name")
    ]


def intent_threshold_sources(*, agent_id: int, default: float) -> list[dict[str, object]]:
    """Each of the agent's categories with its effective threshold and where it comes from."""
    rows = []
    for c in IntentCategory.objects.filter(agent_id=agent_id).order_by("name"):
        if c.threshold is None:
            value, source = default, "default"
        else:
            value, source = c.threshold, "staff" if "threshold" in c.staff_edited else "code"
        rows.append({"name": c.name, "active": c.active, "threshold": value, "threshold_source": source})
    return rows
