"""Memories in the ops console: browse, search, edit, delete; see where each came from and when it
was last used."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin import helpers
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from agentflow.embeddings import get_embedder
from agentflow.errors import NotFound
from conversations.admin import EndUserAdmin
from conversations.audit import audit_record
from conversations.console.admin_base import ConsoleModelAdmin
from conversations.models import AuditEvent, EndUser

from .models import Memory
from .privacy import user_erase, user_export
from .services import memory_embed

# source key -> the admin page of what it names
_LINKED = {
    "thread": "conversations_thread",
    "session": "conversations_chatsession",
    "message": "conversations_message",
}


def _link(model: str, pk: Any) -> SafeString:
    try:
        url = reverse(f"admin:{model}_change", args=[pk])
    except NoReverseMatch:
        return format_html("{}", pk)
    return format_html('<a href="{}">{}</a>', url, str(pk)[:8])


def provenance_html(source: dict[str, Any]) -> SafeString:
    """Where a memory came from, as links to the thread, session and messages it was written from;
    the sources of the near-duplicates it absorbed follow, one line each."""
    parts = []
    if source.get("by"):
        parts.append(format_html("by {}", source["by"]))
    if source.get("summary"):
        parts.append(format_html("summary: {}", source["summary"]))
    if source.get("privacy"):
        parts.append(format_html("privacy: {}", source["privacy"]))
    if source.get("held"):
        parts.append(format_html("<strong>held for review: {}</strong>", source["held"]))
    for key, model in _LINKED.items():
        if source.get(key):
            parts.append(format_html("{} {}", key, _link(model, source[key])))
    if source.get("messages"):
        links = format_html_join(
            ", ", "{}", ((_link("conversations_message", pk),) for pk in source["messages"])
        )
        parts.append(format_html("messages {}", links))
    line = format_html_join("; ", "{}", ((part,) for part in parts)) if parts else format_html("{}", "(none)")
    merged = source.get("merged") or []
    if not merged:
        return line
    earlier = format_html_join(
        "", "<li>{}</li>", ((provenance_html(m),) for m in merged if isinstance(m, dict))
    )
    if source.get("merged_dropped"):
        earlier = format_html("{}<li>and {} earlier</li>", earlier, source["merged_dropped"])
    return format_html("{}<br>merged from:<ul>{}</ul>", line, earlier)


class MemoryForm(forms.ModelForm):
    """A user's memory belongs to the user's agent; a global one names its agent."""

    class Meta:
        model = Memory
        fields = ("agent", "user", "kind", "content")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["agent"].required = False
        self.fields[
            "agent"
        ].help_text = "Needed for a global memory; a user's memory follows the user's agent."

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}
        user, agent = data.get("user"), data.get("agent")
        if user is not None:
            data["agent"] = user.agent
        elif agent is None and self.instance.agent_id is not None:
            data["agent"] = self.instance.agent
        elif agent is None:
            self.add_error("agent", "A global memory belongs to one agent: choose it.")
        return data


@admin.register(Memory)
class MemoryAdmin(ConsoleModelAdmin):
    list_display = (
        "short_content",
        "agent",
        "owner",
        "kind",
        "approved",
        "use_count",
        "last_used_at",
        "updated_at",
        "came_from",
    )
    list_filter = ("agent", "kind", "approved", ("user", admin.EmptyFieldListFilter), "embedding_model")
    actions = ["approve", "withdraw"]
    search_fields = ("content", "user__external_id")
    list_select_related = ("user", "agent")
    form = MemoryForm
    readonly_fields = (
        "provenance",
        "approved",
        "embedding_model",
        "use_count",
        "created_at",
        "updated_at",
        "last_used_at",
    )
    raw_id_fields = ("user",)
    date_hierarchy = "updated_at"

    def _set_approved(self, request: HttpRequest, queryset: Any, approved: bool) -> int:
        """Approve or withdraw the selected global memories that change; each is logged and audited."""
        changing = list(queryset.filter(user__isnull=True).exclude(approved=approved))
        Memory.objects.filter(pk__in=[memory.pk for memory in changing]).update(approved=approved)
        action = AuditEvent.Action.MEMORY_APPROVE if approved else AuditEvent.Action.MEMORY_WITHDRAW
        for memory in changing:
            audit_record(action=action, staff_user=request.user, target=memory)
            self.log_change(request, memory, "Approved." if approved else "Withdrawn from use.")
        return len(changing)

    @admin.action(description="Approve selected global memories (the review queue)")
    def approve(self, request: HttpRequest, queryset: Any) -> None:
        count = self._set_approved(request, queryset, True)
        self.message_user(request, f"{count} global memories approved; agents may use them now.")

    @admin.action(description="Withdraw selected global memories from use")
    def withdraw(self, request: HttpRequest, queryset: Any) -> None:
        count = self._set_approved(request, queryset, False)
        self.message_user(request, f"{count} global memories withdrawn.")

    @admin.display(description="content")
    def short_content(self, obj: Memory) -> str:
        return obj.content[:80]

    @admin.display(description="user", ordering="user__external_id")
    def owner(self, obj: Memory) -> SafeString:
        if obj.user is None:
            return format_html("{}", "(global)")
        url = reverse("admin:conversations_enduser_change", args=[obj.user_id])
        return format_html('<a href="{}">{}</a>', url, obj.user.external_id)

    @admin.display(description="came from")
    def came_from(self, obj: Memory) -> SafeString:
        thread = obj.source.get("thread")
        by = obj.source.get("by", "")
        return (
            format_html("{} {}", by, _link("conversations_thread", thread))
            if thread
            else format_html("{}", by)
        )

    @admin.display(description="provenance")
    def provenance(self, obj: Memory) -> SafeString:
        return provenance_html(obj.source or {})

    def save_model(self, request: HttpRequest, obj: Memory, form: Any, change: bool) -> None:
        # The embedding is not on the form: a new or edited content needs its vector, or search misses it.
        if not change:
            obj.source = {"by": f"staff {request.user.get_username()}"}
        if obj.user is not None:
            obj.agent_id = obj.user.agent_id  # a user's memory belongs to the user's agent
        if not change or "content" in form.changed_data:
            memory_embed(memory=obj, embedder=get_embedder())
        super().save_model(request, obj, form, change)


class PrivacyEndUserAdmin(EndUserAdmin):
    """The end users' admin with export and erase, which reach into memories as well."""

    actions = ["export_users", "erase_users"]

    @admin.action(description="Export selected users (JSON)")
    def export_users(self, request: HttpRequest, queryset: QuerySet[EndUser]) -> HttpResponse:
        exports = [
            user_export(user=user, staff_user=request.user) for user in queryset.order_by("external_id")
        ]
        response = HttpResponse(
            json.dumps({"users": exports}, indent=2, ensure_ascii=False), content_type="application/json"
        )
        stamp = timezone.now().strftime("%Y%m%dT%H%M%SZ")
        response["Content-Disposition"] = f'attachment; filename="agentflow-users-{stamp}.json"'
        return response

    @admin.action(description="Erase selected users and all their data", permissions=["delete"])
    def erase_users(self, request: HttpRequest, queryset: QuerySet[EndUser]) -> HttpResponse | None:
        """A confirmation page listing what goes; the confirmed POST erases and reports the counts."""
        users = list(queryset.order_by("external_id"))
        if request.POST.get("confirm") != "yes":
            rows = [
                {
                    "user": user,
                    "sessions": user.sessions.count(),
                    "threads": user.threads.count(),
                    "messages": user.messages.count(),
                    "escalations": user.escalations.count(),
                    "memories": user.memories.count(),
                }
                for user in users
            ]
            context = {
                **self.admin_site.each_context(request),
                "opts": self.opts,
                "title": "Erase users and all their data?",
                "rows": rows,
                "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
            }
            return TemplateResponse(request, "admin/conversations/enduser/erase_confirmation.html", context)
        self._erase(request, users)
        return None

    def _erase(self, request: HttpRequest, users: list[EndUser]) -> None:
        totals: Counter[str] = Counter()
        erased = 0
        # Django's admin log (the audit trail records each erase too); logged before the rows go.
        self.log_deletions(request, EndUser.objects.filter(pk__in=[user.pk for user in users]))
        for user in users:
            try:
                totals.update(user_erase(user=user, staff_user=request.user))
            except NotFound:  # erased meanwhile
                continue
            erased += 1
        summary = ", ".join(f"{count} {kind.replace('_', ' ')}" for kind, count in totals.items())
        self.message_user(
            request, f"Erased {erased} user(s): {summary or 'nothing'}.", level=messages.SUCCESS
        )

    def delete_model(self, request: HttpRequest, obj: EndUser) -> None:
        # Deleting from the admin is an erase: global memories' provenance is cleaned as well.
        try:
            user_erase(user=obj, staff_user=request.user)
        except NotFound:
            pass

    def delete_queryset(self, request: HttpRequest, queryset: QuerySet[EndUser]) -> None:
        for user in queryset:
            try:
                user_erase(user=user, staff_user=request.user)
            except NotFound:
                pass


admin.site.unregister(EndUser)
admin.site.register(EndUser, PrivacyEndUserAdmin)
