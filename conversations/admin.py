"""The ops console for conversations: users, sessions, threads (as timelines), messages, API keys."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.http import HttpRequest

from .models import ApiKey, ChatSession, EndUser, Message, Thread
from .services import api_key_create


class ReadOnlyInline(admin.TabularInline):
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class SessionInline(ReadOnlyInline):
    model = ChatSession
    fields = ("id", "status", "started_at", "last_activity_at", "expires_at")
    readonly_fields = fields


class ThreadInline(ReadOnlyInline):
    model = Thread
    fields = ("topic", "status", "intent", "escalated", "opened_at", "last_activity_at", "resolved_at")
    readonly_fields = fields
    ordering = ("opened_at",)


class MessageInline(ReadOnlyInline):
    model = Message
    fk_name = "thread"
    fields = ("created_at", "role", "content", "thread_event", "intent", "confidence", "escalated", "offline")
    readonly_fields = fields
    ordering = ("created_at",)


@admin.register(EndUser)
class EndUserAdmin(admin.ModelAdmin):
    list_display = ("external_id", "display_name", "created_at", "last_seen_at")
    search_fields = ("external_id", "display_name")
    readonly_fields = ("created_at", "last_seen_at")
    inlines = [SessionInline, ThreadInline]


@admin.register(ChatSession)
class ChatSessionAdmin(admin.ModelAdmin):
    list_display = ("id", "user", "status", "started_at", "last_activity_at", "expires_at")
    list_filter = ("status",)
    search_fields = ("user__external_id", "id")
    list_select_related = ("user",)
    readonly_fields = ("id", "user", "started_at", "last_activity_at", "expires_at", "ended_at", "ttl_seconds")


@admin.register(Thread)
class ThreadAdmin(admin.ModelAdmin):
    """A thread's page is its timeline: every message with the decisions taken on it."""

    list_display = ("topic", "user", "status", "intent", "escalated", "opened_at", "last_activity_at")
    list_filter = ("status", "escalated", "intent")
    search_fields = ("topic", "user__external_id", "resolution")
    list_select_related = ("user",)
    date_hierarchy = "opened_at"
    exclude = ("topic_embedding",)
    readonly_fields = ("id", "user", "session", "opened_at", "last_activity_at", "resolved_at", "topic_weight")
    inlines = [MessageInline]


@admin.register(Message)
class MessageAdmin(admin.ModelAdmin):
    list_display = (
        "created_at", "user", "role", "short_content", "thread_event", "intent", "confidence",
        "escalated", "offline", "status", "latency_ms",
    )
    list_filter = ("role", "status", "thread_event", "escalated", "offline", "intent")
    search_fields = ("content", "user__external_id", "client_message_id")
    list_select_related = ("user",)
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in Message._meta.fields]

    @admin.display(description="content")
    def short_content(self, obj: Message) -> str:
        return obj.content[:80]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    list_display = ("name", "prefix", "active", "created_at", "last_used_at")
    list_filter = ("active",)
    search_fields = ("name", "prefix")
    fields = ("name", "active", "prefix", "created_at", "last_used_at")
    readonly_fields = ("prefix", "created_at", "last_used_at")

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            return
        created, plain = api_key_create(name=obj.name)
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = created.pk, created.prefix, created.key_hash, created.created_at
        obj._state.adding = False
        messages.warning(request, f"The new API key is {plain} - copy it now, it is not shown again.")
