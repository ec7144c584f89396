"""The ops console for conversations: users, sessions, threads (as timelines), messages, API keys."""

from __future__ import annotations

from typing import Any

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest

from agentflow.errors import InvalidInput

from .models import ApiKey, ChatSession, EndUser, Message, Thread, ThreadActivity
from .services import (
    api_key_create,
    thread_split,
    thread_staff_reopen,
    thread_staff_resolve,
    threads_merge,
)


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


class ThreadActivityInline(ReadOnlyInline):
    model = ThreadActivity
    fields = ("created_at", "kind", "actor", "message", "staff_user")
    readonly_fields = fields
    ordering = ("created_at",)
    show_change_link = False


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
    inlines = [ThreadActivityInline, MessageInline]
    actions = ["resolve_threads", "reopen_threads", "merge_threads"]

    @admin.action(description="Resolve selected threads")
    def resolve_threads(self, request: HttpRequest, queryset: QuerySet[Thread]) -> None:
        threads = list(queryset.exclude(status=Thread.Status.RESOLVED))
        for thread in threads:
            thread_staff_resolve(thread=thread, staff_user=request.user)
        self.message_user(request, f"Resolved {len(threads)} thread(s).", level=messages.SUCCESS)

    @admin.action(description="Reopen selected threads")
    def reopen_threads(self, request: HttpRequest, queryset: QuerySet[Thread]) -> None:
        threads = list(queryset.exclude(status=Thread.Status.OPEN))
        for thread in threads:
            thread_staff_reopen(thread=thread, staff_user=request.user)
        self.message_user(request, f"Reopened {len(threads)} thread(s).", level=messages.SUCCESS)

    @admin.action(description="Merge selected threads into the most recent one")
    def merge_threads(self, request: HttpRequest, queryset: QuerySet[Thread]) -> None:
        threads = list(queryset.order_by("-last_activity_at", "-opened_at"))
        if len(threads) < 2 or len({t.user_id for t in threads}) != 1:
            self.message_user(
                request, "Select two or more threads of one user to merge.", level=messages.ERROR
            )
            return
        target, sources = threads[0], threads[1:]
        for source in sources:
            threads_merge(source=source, target=target, staff_user=request.user)
        self.message_user(
            request, f"Merged {len(sources)} thread(s) into “{target}”.", level=messages.SUCCESS
        )


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
    actions = ["split_thread"]

    @admin.display(description="content")
    def short_content(self, obj: Message) -> str:
        return obj.content[:80]

    @admin.action(description="Split thread at this message")
    def split_thread(self, request: HttpRequest, queryset: QuerySet[Message]) -> None:
        selected = list(queryset[:2])
        if len(selected) != 1 or selected[0].role != Message.Role.USER:
            self.message_user(request, "Select exactly one user message to split at.", level=messages.ERROR)
            return
        try:
            new = thread_split(message=selected[0], staff_user=request.user)
        except InvalidInput as exc:
            self.message_user(request, str(exc), level=messages.ERROR)
            return
        self.message_user(request, f"Split into the new thread “{new}”.", level=messages.SUCCESS)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(ThreadActivity)
class ThreadActivityAdmin(admin.ModelAdmin):
    """Every thread event with its time: what analytics count openings, returns and resolutions from."""

    list_display = ("created_at", "user", "thread", "kind", "actor", "staff_user")
    list_filter = ("kind", "actor")
    search_fields = ("user__external_id",)
    list_select_related = ("user", "thread", "staff_user")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in ThreadActivity._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
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
