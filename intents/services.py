"""Writes of intent categories."""

from __future__ import annotations

from collections.abc import Sequence

from agentflow.types import IntentCategory as IntentCategorySpec

from .models import IntentCategory


def intent_categories_sync(*, categories: Sequence[IntentCategorySpec]) -> int:
    """Record the categories defined in code so that ops staff see them in the admin.

    New ones are created; for existing ones the code's description and examples are written,
    while the fields staff own in the admin (threshold, hand-off, active, prompt) are kept.

    Returns:
        How many categories were created.
    """
    created = 0
    for spec in categories:
        obj, was_created = IntentCategory.objects.get_or_create(
            name=spec.name,
            defaults={
                "description": spec.description,
                "examples": list(spec.examples),
                "threshold": spec.threshold,
                "handoff": spec.handoff,
                "system_prompt": spec.system_prompt,
                "source": IntentCategory.Source.CODE,
            },
        )
        if was_created:
            created += 1
        elif obj.description != spec.description or list(obj.examples) != list(spec.examples):
            obj.description = spec.description
            obj.examples = list(spec.examples)
            obj.save(update_fields=["description", "examples", "updated_at"])
    return created
