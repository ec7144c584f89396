"""Intent categories: the domain's vocabulary, editable by ops staff in the admin."""

from __future__ import annotations

from django.contrib.postgres.fields import ArrayField
from django.db import models
from django.db.models import Q


class IntentCategory(models.Model):
    """What users come for (``OUTAGE``, ``ORDER_STATUS``...) and how the agent treats it.

    ``threshold`` is the confidence the agent needs to answer on its own; ``None`` means the
    configured default. ``0.0`` or ``handoff=True`` means a human always takes the thread.
    """

    class Source(models.TextChoices):
        CODE = "code", "defined in code"
        ADMIN = "admin", "created in the admin"

    # No index of its own: the unique (agent, name) index starts with it.
    agent = models.ForeignKey(
        "conversations.Agent", on_delete=models.CASCADE, related_name="intent_categories", db_index=False
    )
    name = models.CharField(max_length=100)
    description = models.TextField(blank=True)
    examples = ArrayField(models.TextField(), default=list, blank=True)
    threshold = models.FloatField(null=True, blank=True)
    handoff = models.BooleanField(default=False, help_text="Always hand threads of this intent to a human.")

    class LowConfidence(models.TextChoices):
        HANDOFF = "handoff", "hand off to a human"
        CLARIFY = "clarify", "ask the user to clarify"

    system_prompt = models.TextField(blank=True)
    on_low_confidence = models.CharField(
        max_length=8,
        choices=LowConfidence.choices,
        default=LowConfidence.HANDOFF,
        help_text="What happens below the threshold.",
    )
    active = models.BooleanField(default=True)
    staff_edited = models.JSONField(
        default=list,
        blank=True,
        help_text="Fields staff changed in the admin: code no longer sets them (see docs/configuration.md).",
    )
    source = models.CharField(
        max_length=8,
        choices=Source.choices,
        default=Source.ADMIN,
        help_text="code: description and examples follow the code on each deploy; admin: staff own them.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name_plural = "intent categories"
        constraints = [
            models.UniqueConstraint(fields=["agent", "name"], name="intent_unique_name_per_agent"),
            models.CheckConstraint(
                condition=Q(threshold__isnull=True) | Q(threshold__gte=0, threshold__lte=1),
                name="intent_threshold_in_unit_interval",
            ),
            models.CheckConstraint(condition=~Q(name=""), name="intent_name_not_empty"),
        ]

    def __str__(self) -> str:
        return self.name
