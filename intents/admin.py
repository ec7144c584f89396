"""Intent categories in the ops console: staff edit examples, thresholds, hand-off and prompts."""

from __future__ import annotations

from typing import Any

from django import forms
from django.contrib import admin
from django.http import HttpRequest

from agentflow.errors import ConfigError
from agentflow.validation import validate_intent_fields
from conversations.audit import audit_record
from conversations.console.admin_base import ConsoleModelAdmin
from conversations.models import AuditEvent

from .models import IntentCategory
from .services import CODE_FIELDS


class IntentCategoryForm(forms.ModelForm):
    examples = forms.CharField(
        widget=forms.Textarea(attrs={"rows": 8}),
        required=False,
        help_text="One example phrase per line.",
    )

    class Meta:
        model = IntentCategory
        fields = (
            "agent",
            "name",
            "description",
            "examples",
            "threshold",
            "on_low_confidence",
            "handoff",
            "system_prompt",
            "active",
        )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.instance and self.instance.pk:
            self.initial["examples"] = "\n".join(self.instance.examples)
        self.fields["on_low_confidence"].required = False  # blank keeps the default: hand off

    def clean_on_low_confidence(self) -> str:
        return self.cleaned_data.get("on_low_confidence") or IntentCategory.LowConfidence.HANDOFF

    def clean_examples(self) -> list[str]:
        raw = self.cleaned_data.get("examples") or ""
        return [line.strip() for line in raw.splitlines() if line.strip()]

    def save(self, commit: bool = True) -> IntentCategory:
        # Staff rewording a code-defined category take it over: later deploys stop overwriting it.
        if self.instance.pk and {"description", "examples"} & set(self.changed_data):
            self.instance.source = IntentCategory.Source.ADMIN
        return super().save(commit=commit)

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        if self.errors:
            return data
        try:
            validate_intent_fields(
                data.get("name"),
                data.get("description") or "",
                data.get("examples") or [],
                data.get("threshold"),
            )
        except ConfigError as exc:
            message = str(exc)
            field = "threshold" if "threshold" in message else "examples" if "example" in message else "name"
            self.add_error(field, message)
        return data


def mark_staff_edited(obj: IntentCategory) -> None:
    """Record which code-defined fields staff changed: from now on code no longer sets them."""
    fields = (*CODE_FIELDS, "active")  # staff switching a category on or off owns that too
    before = IntentCategory.objects.filter(pk=obj.pk).values(*fields).first() if obj.pk else None
    if before is None:
        return
    owned = {field for field in fields if getattr(obj, field) != before[field]}
    if owned:
        obj.staff_edited = sorted(set(obj.staff_edited) | owned)


@admin.register(IntentCategory)
class IntentCategoryAdmin(ConsoleModelAdmin):
    """The database is the source of truth: edits apply to the next message on every process.

    Each category belongs to one agent. Code sets the fields it defines on every build until staff
    change one here; from then on that field is the staff's ("Staff own" lists them; the action
    "Let code set these fields again" hands them back).
    """

    form = IntentCategoryForm
    readonly_fields = ("source", "staff_owns", "updated_at")
    list_display = (
        "name",
        "agent",
        "active",
        "threshold",
        "threshold_source",
        "handoff",
        "example_count",
        "updated_at",
    )
    list_filter = ("agent", "active", "handoff", "on_low_confidence", "source")
    list_editable = ("active", "threshold", "handoff")
    search_fields = ("name", "description")
    actions = ("release_to_code",)

    @admin.display(description="threshold from")
    def threshold_source(self, obj: IntentCategory) -> str:
        if obj.threshold is None:
            return "default"
        return "staff" if "threshold" in obj.staff_edited else "code"

    @admin.display(description="staff own")
    def staff_owns(self, obj: IntentCategory) -> str:
        return ", ".join(obj.staff_edited) or "nothing (code sets every field it defines)"

    @admin.action(description="Let code set these categories' fields again")
    def release_to_code(self, request: Any, queryset: Any) -> None:
        count = queryset.update(staff_edited=[])
        self.message_user(request, f"{count} categories: code sets their fields again on the next build.")

    @admin.display(description="examples")
    def example_count(self, obj: IntentCategory) -> int:
        return len(obj.examples)

    def save_model(self, request: HttpRequest, obj: IntentCategory, form: Any, change: bool) -> None:
        """Save, then audit the edit (from the change form or the list's editable columns).

        The code-defined fields staff changed are recorded first: code no longer sets them.
        """
        before = dict(form.initial) if change else {}
        mark_staff_edited(obj)
        super().save_model(request, obj, form, change)
        changed = sorted(form.changed_data)
        if change and not changed:
            return
        detail: dict[str, Any] = {"name": obj.name, "changed": changed}
        for field in ("threshold", "handoff", "active", "on_low_confidence"):
            if field in changed:
                detail[field] = {"from": before.get(field), "to": getattr(obj, field)}
        audit_record(
            action=AuditEvent.Action.CATEGORY_CHANGE if change else AuditEvent.Action.CATEGORY_CREATE,
            staff_user=request.user,
            target=obj,
            detail=detail,
        )
