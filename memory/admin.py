"""Memories in the ops console: browse, search, edit, delete; see where each came from and when it
was last used."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest
from django.urls import NoReverseMatch, reverse
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString

from agentflow.embeddings import get_embedder
from conversations.audit import audit_record
from conversations.models import AuditEvent

from .models import Memory
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
    return format_html("{}<br>merged from:<ul>{}</ul>", line, earlier)


@admin.register(Memory)
class MemoryAdmin(admin.ModelAdmin):
    list_display = (
        "short_content",
        "owner",
        "kind",
        "approved",
        "use_count",
        "last_used_at",
        "updated_at",
        "came_from",
    )
    list_filter = ("kind", "approved", ("user", admin.EmptyFieldListFilter), "embedding_model")
    actions = ["approve", "withdraw"]
    search_fields = ("content", "user__external_id")
    list_select_related = ("user",)
    exclude = ("embedding", "source")
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
        if obj.user_id is None:
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
        if not change or "content" in form.changed_data:
            memory_embed(memory=obj, embedder=get_embedder())
        super().save_model(request, obj, form, change)
