"""Writes of intent categories."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from django.utils import timezone

from agentflow.types import IntentCategory as IntentCategorySpec

from .models import IntentCategory

logger = logging.getLogger("agentflow.intents")

# The fields code defines and staff may edit; a staff edit wins over code from then on.
CODE_FIELDS = ("description", "examples", "threshold", "handoff", "on_low_confidence", "system_prompt")


def _code_values(spec: IntentCategorySpec | None, threshold: float | None) -> dict[str, Any]:
    values: dict[str, Any] = {}
    if spec is not None:
        values = {
            "description": spec.description,
            "examples": list(spec.examples),
            "handoff": spec.handoff,
            "on_low_confidence": spec.on_low_confidence,
            "system_prompt": spec.system_prompt,
        }
        if spec.threshold is not None:
            threshold = spec.threshold
    if threshold is not None:
        values["threshold"] = threshold
    return values


def intent_categories_sync(
    *,
    agent: Any,
    categories: Sequence[IntentCategorySpec] | None,
    thresholds: Mapping[str, float] | None = None,
    threshold_origin: Mapping[str, str] | None = None,
) -> int:
    """Write an agent's categories and thresholds defined in code to the database.

    The precedence (docs/configuration.md): a field code defines (description, examples, threshold,
    hand-off, low-confidence policy, prompt; a threshold from the category, else
    ``with_confidence_thresholds``, else ``intent_specific`` in the configuration) is written on every
    build, unless staff changed that field in the admin: then the staff value stays and one warning
    names the agent, the category, both values and the winner. Categories that code does not define
    are left to staff, except for their thresholds named in ``thresholds``.

    ``categories`` is the agent's whole list: a category code defined earlier that is no longer in it
    is deactivated (staff can still see it in the admin); ``None`` leaves the categories as they are.

    Returns:
        How many categories were created.
    """
    thresholds = dict(thresholds or {})
    threshold_origin = dict(threshold_origin or {})
    specs = {spec.name: spec for spec in categories or ()}
    created = 0
    for name in [*specs, *(n for n in thresholds if n not in specs)]:
        spec = specs.get(name)
        values = _code_values(spec, thresholds.get(name))
        if spec is None:
            obj = IntentCategory.objects.filter(agent=agent, name=name).first()
            if obj is None:
                continue  # a threshold for a category that does not exist (build() checked the names)
        else:
            obj, was_created = IntentCategory.objects.get_or_create(
                agent=agent, name=name, defaults={**values, "source": IntentCategory.Source.CODE}
            )
            if was_created:
                created += 1
                continue
        changed: list[str] = []
        if not obj.active and "active" not in obj.staff_edited and obj.source == IntentCategory.Source.CODE:
            obj.active = True  # code defines it again (it was dropped from an earlier build)
            changed.append("active")
        for field, value in values.items():
            current = list(getattr(obj, field)) if field == "examples" else getattr(obj, field)
            if current == value:
                continue
            if field in obj.staff_edited:
                origin = "the configuration" if threshold_origin.get(name) == "config" else "code"
                logger.warning(
                    "agent %s, intent %s: %s sets %s = %r but staff set %r in the admin; the staff value wins "
                    "(the admin action 'Let code set these categories' fields again' hands it back to %s)",
                    agent.name,
                    name,
                    origin,
                    field,
                    value,
                    current,
                    origin,
                )
                continue
            setattr(obj, field, value)
            changed.append(field)
        if changed:
            obj.save(update_fields=[*changed, "updated_at"])
    if categories is not None:
        gone = IntentCategory.objects.filter(
            agent=agent, source=IntentCategory.Source.CODE, active=True
        ).exclude(name__in=list(specs))
        names = sorted(gone.values_list("name", flat=True))
        if names:
            gone.update(active=False, updated_at=timezone.now())
            logger.warning(
                "agent %s: intent categories %s are no longer defined in code; deactivated",
                agent.name,
                ", ".join(names),
            )
    return created
