"""Memories in the ops console: browse, search, edit, delete; see where each came from."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from agentflow.embeddings import get_embedder

from .models import Memory
from .services import memory_embed


@admin.register(Memory)
class MemoryAdmin(admin.ModelAdmin):
    list_display = ("short_content", "user", "kind", "approved", "use_count", "last_used_at", "updated_at")
    list_filter = ("kind", "approved", ("user", admin.EmptyFieldListFilter))
    actions = ["approve", "withdraw"]
    search_fields = ("content", "user__external_id")
    list_select_related = ("user",)
    exclude = ("embedding",)
    readonly_fields = ("approved", "embedding_model", "use_count", "created_at", "updated_at", "last_used_at")
    raw_id_fields = ("user",)

    @admin.action(description="Approve selected global memories (the review queue)")
    def approve(self, request: HttpRequest, queryset: Any) -> None:
        count = queryset.filter(user__isnull=True).update(approved=True)
        self.message_user(request, f"{count} global memories approved; agents may use them now.")

    @admin.action(description="Withdraw selected global memories from use")
    def withdraw(self, request: HttpRequest, queryset: Any) -> None:
        count = queryset.filter(user__isnull=True).update(approved=False)
        self.message_user(request, f"{count} global memories withdrawn.")

    @admin.display(description="content")
    def short_content(self, obj: Memory) -> str:
        return obj.content[:80]

    def save_model(self, request: HttpRequest, obj: Memory, form: Any, change: bool) -> None:
        # The embedding is not on the form: a new or edited content needs its vector, or search misses it.
        if not change or "content" in form.changed_data:
            memory_embed(memory=obj, embedder=get_embedder())
        super().save_model(request, obj, form, change)
