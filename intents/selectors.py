"""Reads of intent categories."""

from __future__ import annotations

from agentflow.types import IntentCategory as IntentCategorySpec

from .models import IntentCategory


def intent_categories_active() -> list[IntentCategorySpec]:
    """The active categories of the admin, as the public value type."""
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
        for c in IntentCategory.objects.filter(active=True).order_by("name")
    ]
