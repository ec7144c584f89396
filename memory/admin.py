"""Memories in the ops console: browse, search, edit, delete; see where each came from."""

from __future__ import annotations

from django.contrib import admin

from .models import Memory


@admin.register(Memory)
class MemoryAdmin(admin.ModelAdmin):
    list_display = ("short_content", "user", "kind", "use_count", "last_used_at", "updated_at")
    list_filter = ("kind", ("user", admin.EmptyFieldListFilter))
    search_fields = ("content", "user__external_id")
    list_select_related = ("user",)
    exclude = ("embedding",)
    readonly_fields = ("embedding_model", "use_count", "created_at", "updated_at", "last_used_at")
    raw_id_fields = ("user",)

    @admin.display(description="content")
    def short_content(self, obj: Memory) -> str:
        return obj.content[:80]
