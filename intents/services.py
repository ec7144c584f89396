"""Writes of intent categories."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from agentflow.types import IntentCategory as IntentCategorySpec

from .models import IntentCategory


def intent_categories_sync(
    *, categories: Sequence[IntentCategorySpec], thresholds: Mapping[str, float] | None = None
) -> int:
    """Write the categories defined in code to the database, the source of truth at run time.

    New ones are created with the code's threshold (the category's own, else ``thresholds``, i.e.
    ``with_confidence_thresholds`` / ``intent_specific``), hand-off flag and prompt. For existing ones
    the code's description and examples are written unless staff edited those in the admin (the
    category's source is then "admin"); the fields staff own (threshold, hand-off, active, prompt)
    are always kept.

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
                "threshold": spec.threshold
                if spec.threshold is not None
                else (thresholds or {}).get(spec.name),
                "handoff": spec.handoff,
                "on_low_confidence": spec.on_low_confidence,
                "system_prompt": spec.system_prompt,
                "source": IntentCategory.Source.CODE,
            },
        )
        if was_created:
            created += 1
        elif obj.source == IntentCategory.Source.CODE and (
            obj.description != spec.description or list(obj.examples) != list(spec.examples)
        ):
            obj.description = spec.description
            obj.examples = list(spec.examples)
            obj.save(update_fields=["description", "examples", "updated_at"])
    return created
