"""The ops console for conversations: users, sessions, threads (as timelines), messages, API keys."""

from __future__ import annotations

import json
from datetime import datetime
from functools import partial
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db.models import Count, QuerySet
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import URLPattern, path, reverse
from django.utils import timezone
from django.utils.dateformat import format as date_format
from django.utils.html import format_html, format_html_join
from django.utils.safestring import SafeString
from django.utils.text import Truncator
from django.utils.timesince import timesince

from agentflow.errors import InvalidInput

from .audit import audit_record
from .console.admin_base import ConsoleModelAdmin
from .console.queue import reason_label
from .console.views import inbox_action, inbox_reply, inbox_view
from .handoff import escalation_claim, escalation_release, escalation_resolve, staff_reply
from .live import live_link, live_page
from .models import (
    Agent,
    ApiKey,
    AuditEvent,
    CannedReply,
    ChatSession,
    EndUser,
    Escalation,
    Message,
    Thread,
    ThreadActivity,
)
from .services import (
    api_key_create,
    thread_split,
    thread_staff_reopen,
    thread_staff_resolve,
    threads_merge,
)


def _stamp(value: datetime) -> str:
    """A timestamp as every console page shows it: the site's time zone, one format."""
    return date_format(timezone.localtime(value), "Y-m-d H:i")


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
class EndUserAdmin(ConsoleModelAdmin):
    """End users, one row per agent they talk to. Export and erase are added by ``memory.admin``
    (they cover memories too), which registers its subclass of this admin."""

    list_display = ("external_id", "agent", "display_name", "created_at", "last_seen_at", "live")
    list_filter = ("agent",)
    list_select_related = ("agent",)
    search_fields = ("external_id", "display_name")
    readonly_fields = ("created_at", "last_seen_at", "live")
    inlines = [SessionInline, ThreadInline]

    @admin.display(description="live")
    def live(self, obj: EndUser) -> str:
        return live_link(user_pk=obj.pk) if obj.pk else "-"

    def get_urls(self) -> list[URLPattern]:
        live = path(
            "<path:object_id>/live/",
            self.admin_site.admin_view(self.live_view),
            name="conversations_enduser_live",
        )
        return [live, *super().get_urls()]

    def live_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """The live conversation page (conversations/live.py): watch, claim, reply."""
        end_user = self.get_object(request, object_id)
        if end_user is None:
            raise Http404("no such end user")
        if not self.has_view_permission(request, end_user):
            raise PermissionDenied
        context = {**self.admin_site.each_context(request), "opts": self.opts, "original": end_user}
        return live_page(request, end_user=end_user, admin_context=context)


@admin.register(ChatSession)
class ChatSessionAdmin(ConsoleModelAdmin):
    list_display = ("id", "user", "status", "started_at", "last_activity_at", "expires_at")
    list_filter = (("user__agent", admin.RelatedOnlyFieldListFilter), "status")
    search_fields = ("user__external_id", "id")
    list_select_related = ("user",)
    readonly_fields = (
        "id",
        "user",
        "started_at",
        "last_activity_at",
        "expires_at",
        "ended_at",
        "ttl_seconds",
    )


@admin.register(Thread)
class ThreadAdmin(ConsoleModelAdmin):
    """A thread's page is its timeline: every message with the decisions taken on it."""

    list_display = ("topic_short", "user", "status", "intent", "escalated", "last_activity_at", "live")
    list_display_links = ("topic_short",)
    list_filter = (("user__agent", admin.RelatedOnlyFieldListFilter), "status", "escalated", "intent")
    search_fields = ("topic", "user__external_id", "resolution")
    list_select_related = ("user",)
    date_hierarchy = "opened_at"
    # The thread's state, read-only and in words: the detector's vectors and vocabulary are its own
    # working data (staff change a thread with the actions: resolve, reopen, merge, split).
    fields = (
        "topic",
        ("user", "session"),
        ("status", "intent", "escalated"),
        ("opened_at", "last_activity_at", "resolved_at"),
        "resolution",
        "detector_state",
        "live",
    )
    readonly_fields = (
        "topic",
        "user",
        "session",
        "status",
        "intent",
        "escalated",
        "opened_at",
        "last_activity_at",
        "resolved_at",
        "resolution",
        "detector_state",
        "live",
    )
    inlines = [ThreadActivityInline, MessageInline]
    actions = ["resolve_threads", "reopen_threads", "merge_threads", "create_jira_issue"]

    @admin.display(description="live")
    def live(self, obj: Thread) -> str:
        return live_link(user_pk=obj.user_id)

    @admin.display(description="topic", ordering="topic")
    def topic_short(self, obj: Thread) -> str:
        return Truncator(str(obj)).chars(70)

    @admin.display(description="what the thread detector keeps")
    def detector_state(self, obj: Thread) -> SafeString:
        vectors = [
            label
            for label, value in (
                ("topic", obj.topic_embedding),
                ("opening message", obj.opening_embedding),
                ("last user message", obj.last_user_embedding),
            )
            if value is not None
        ]
        words = list(obj.vocabulary or [])
        return format_html(
            "<p>Topic folded from {} user message(s). Embeddings stored: {}.</p>"
            "<p>Words seen ({}): {}</p><p>Last reply it compares with: {}</p>",
            obj.topic_weight,
            ", ".join(vectors) or "none",
            len(words),
            ", ".join(words[-80:]) or "none",
            Truncator(obj.last_assistant_text).chars(300) or "none",
        )

    @admin.action(description="Resolve selected threads")
    def resolve_threads(self, request: HttpRequest, queryset: QuerySet[Thread]) -> None:
        threads = list(queryset.exclude(status=Thread.Status.RESOLVED))
        for thread in threads:
            thread_staff_resolve(thread=thread, staff_user=request.user)
            self.log_change(request, thread, "Resolved by staff.")
        self.message_user(request, f"Resolved {len(threads)} thread(s).", level=messages.SUCCESS)

    @admin.action(description="Reopen selected threads")
    def reopen_threads(self, request: HttpRequest, queryset: QuerySet[Thread]) -> None:
        threads = list(queryset.exclude(status=Thread.Status.OPEN))
        for thread in threads:
            thread_staff_reopen(thread=thread, staff_user=request.user)
            self.log_change(request, thread, "Reopened by staff.")
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
            self.log_change(request, source, f"Merged into {target.pk}.")
            self.log_change(request, target, f"Merged {source.pk} into this thread.")
        self.message_user(
            request, f"Merged {len(sources)} thread(s) into “{target}”.", level=messages.SUCCESS
        )

    @admin.action(description="Create Jira issue (summary and transcript)", permissions=["change"])
    def create_jira_issue(self, request: HttpRequest, queryset: QuerySet[Thread]) -> None:
        """One Jira issue per selected thread (tools_config.jira_integration of the thread's agent);
        each key, or the reason it failed, is recorded in the audit trail and shown here."""
        from agentflow.errors import AgentUnavailable
        from agentflow.integrations.settings import jira_settings
        from agentflow.outbound import thread_jira_issue
        from agentflow.registry import agent_for

        threads = list(queryset.select_related("user__agent")[: self.JIRA_BATCH + 1])
        if len(threads) > self.JIRA_BATCH:
            self.message_user(
                request, f"Select at most {self.JIRA_BATCH} threads at a time.", level=messages.ERROR
            )
            return
        for thread in threads:
            agent_row = thread.user.agent
            try:
                settings = jira_settings(
                    agent_for(agent_row.name, version=agent_row.version).config.tools_config
                )
            except AgentUnavailable as exc:
                self.message_user(request, f"“{thread}”: {exc}", level=messages.ERROR)
                continue
            if settings is None or not settings.project_key:
                self.message_user(
                    request,
                    f"Agent {agent_row.name} has no complete jira_integration (server_url, auth_token, project_key).",
                    level=messages.ERROR,
                )
                continue
            result = thread_jira_issue(settings=settings, thread=thread, staff_user=request.user)
            if result.key:
                self.log_change(request, thread, f"Jira issue {result.key} created.")
                self.message_user(
                    request, f"Created Jira issue {result.key} for “{thread}”.", level=messages.SUCCESS
                )
            else:
                self.message_user(
                    request,
                    f"Jira issue for “{thread}” not created: {result.response.describe()}",
                    level=messages.ERROR,
                )

    JIRA_BATCH = 10


@admin.register(Message)
class MessageAdmin(ConsoleModelAdmin):
    list_display = (
        "created_at",
        "user",
        "role",
        "short_content",
        "thread_event",
        "intent",
        "confidence",
        "escalated",
        "offline",
        "status",
        "latency_ms",
    )
    list_filter = (
        ("user__agent", admin.RelatedOnlyFieldListFilter),
        "role",
        "status",
        "thread_event",
        "escalated",
        "offline",
        "intent",
    )
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
        self.log_change(request, selected[0], f"Split its thread here into the new thread {new.pk}.")
        self.message_user(request, f"Split into the new thread “{new}”.", level=messages.SUCCESS)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False


@admin.register(ThreadActivity)
class ThreadActivityAdmin(ConsoleModelAdmin):
    """Every thread event with its time: what analytics count openings, returns and resolutions from."""

    list_display = ("created_at", "user", "thread", "kind", "actor", "staff_user")
    list_filter = (("user__agent", admin.RelatedOnlyFieldListFilter), "kind", "actor")
    search_fields = ("user__external_id",)
    list_select_related = ("user", "thread", "staff_user")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in ThreadActivity._meta.fields]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ApiKey)
class ApiKeyAdmin(ConsoleModelAdmin):
    list_display = ("name", "prefix", "agent", "active", "created_at", "last_used_at")
    list_filter = ("agent", "active")
    search_fields = ("name", "prefix")
    fields = ("name", "agent", "active", "prefix", "created_at", "last_used_at")
    readonly_fields = ("prefix", "created_at", "last_used_at")

    def save_model(self, request: HttpRequest, obj: ApiKey, form: Any, change: bool) -> None:
        if change:
            super().save_model(request, obj, form, change)
            audit_record(
                action=AuditEvent.Action.API_KEY_CHANGE,
                staff_user=request.user,
                api_key=obj,
                actor_kind=AuditEvent.Actor.STAFF,
                target=obj,
                detail={"changed": sorted(form.changed_data), "active": obj.active},
            )
            return
        created, plain = api_key_create(name=obj.name, agent=obj.agent)
        audit_record(
            action=AuditEvent.Action.API_KEY_CREATE,
            staff_user=request.user,
            api_key=created,
            actor_kind=AuditEvent.Actor.STAFF,
            target=created,
        )
        obj.pk, obj.prefix, obj.key_hash, obj.created_at = (
            created.pk,
            created.prefix,
            created.key_hash,
            created.created_at,
        )
        obj._state.adding = False
        messages.warning(request, f"The new API key is {plain} - copy it now, it is not shown again.")


class StaffReplyForm(forms.Form):
    content = forms.CharField(
        label="Reply to the user", required=False, widget=forms.Textarea(attrs={"rows": 4, "cols": 80})
    )


@admin.register(Escalation)
class EscalationAdmin(ConsoleModelAdmin):
    """The hand-off queue: claim a thread, reply as a human agent, hand it back to the bot.

    The inbox (``conversations.console``) is the page staff work from; this list is the full record.
    """

    list_display = ("id", "status", "holder", "thread_link", "user", "short_reason", "waiting", "live")
    list_display_links = ("id", "status")
    list_filter = (
        ("user__agent", admin.RelatedOnlyFieldListFilter),
        "status",
        ("holder", admin.RelatedOnlyFieldListFilter),
    )
    search_fields = ("user__external_id", "reason", "thread__topic")
    list_select_related = ("user", "thread", "holder", "message")
    date_hierarchy = "created_at"
    fields = (
        ("status", "holder"),
        ("user", "thread"),
        "trigger",
        "reason_shown",
        ("created_at", "claimed_at", "resolved_at"),
        "live",
    )
    readonly_fields = [
        "status",
        "holder",
        "user",
        "thread",
        "trigger",
        "reason_shown",
        "created_at",
        "claimed_at",
        "resolved_at",
        "live",
    ]
    actions = ["claim", "release", "hand_back"]
    change_form_template = "admin/conversations/escalation/change_form.html"
    change_list_template = "admin/conversations/escalation/change_list.html"

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # hand the thread back instead: that tells the user and leaves a marker

    @admin.display(description="thread")
    def thread_link(self, obj: Escalation) -> str:
        url = reverse("admin:conversations_thread_change", args=[obj.thread_id])
        return format_html('<a href="{}">{}</a>', url, Truncator(str(obj.thread)).chars(60))

    @admin.display(description="live")
    def live(self, obj: Escalation) -> str:
        return live_link(user_pk=obj.user_id)

    @admin.display(description="reason")
    def short_reason(self, obj: Escalation) -> str:
        return Truncator(reason_label(obj)).chars(90)

    @admin.display(description="reason")
    def reason_shown(self, obj: Escalation) -> str:
        return reason_label(obj)

    @admin.display(description="message that asked for a human")
    def trigger(self, obj: Escalation) -> str:
        return obj.message.content if obj.message is not None else "-"

    @admin.display(description="since", ordering="created_at")
    def waiting(self, obj: Escalation) -> str:
        """Open: how long it has waited; claimed: how long it has been held; resolved: when."""
        if obj.status == Escalation.Status.RESOLVED and obj.resolved_at:
            return format_html('<span title="{}">resolved</span>', _stamp(obj.resolved_at))
        since = (
            obj.claimed_at if obj.status == Escalation.Status.CLAIMED and obj.claimed_at else obj.created_at
        )
        verb = "held" if obj.status == Escalation.Status.CLAIMED else "waiting"
        return format_html(
            '<span title="{}">{} {}</span>', _stamp(since), verb, timesince(since, timezone.now())
        )

    def _apply(self, request: HttpRequest, queryset: QuerySet[Escalation], service: Any, done: str) -> None:
        """Run one service per selected escalation; report each refusal (that one is left unchanged)."""
        count = 0
        for escalation in queryset.order_by("created_at"):
            try:
                service(escalation=escalation, staff_user=request.user)
            except (InvalidInput, PermissionError) as exc:
                self.message_user(request, f"Escalation {escalation.pk}: {exc}.", level=messages.ERROR)
            else:
                count += 1
                self.log_change(request, escalation, f"{done}.")
        if count:
            self.message_user(request, f"{done} {count} escalation(s).", level=messages.SUCCESS)

    @admin.action(description="Claim")
    def claim(self, request: HttpRequest, queryset: QuerySet[Escalation]) -> None:
        self._apply(request, queryset, escalation_claim, "Claimed")

    @admin.action(description="Release")
    def release(self, request: HttpRequest, queryset: QuerySet[Escalation]) -> None:
        self._apply(request, queryset, escalation_release, "Released")

    @admin.action(description="Hand back to the bot")
    def hand_back(self, request: HttpRequest, queryset: QuerySet[Escalation]) -> None:
        self._apply(request, queryset, escalation_resolve, "Handed back")

    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view
        own = [
            path(
                "inbox/", view(partial(inbox_view, model_admin=self)), name="conversations_escalation_inbox"
            ),
            path(
                "inbox/<str:object_id>/reply/",
                view(partial(inbox_reply, model_admin=self)),
                name="conversations_escalation_inbox_reply",
            ),
            path(
                "inbox/<str:object_id>/<str:action>/",
                view(partial(inbox_action, model_admin=self)),
                name="conversations_escalation_inbox_action",
            ),
            path(
                "<path:object_id>/reply/",
                view(self.reply_view),
                name="conversations_escalation_reply",
            ),
        ]
        return [*own, *super().get_urls()]

    def _reply_context(
        self, request: HttpRequest, escalation: Escalation, form: StaffReplyForm
    ) -> dict[str, Any]:
        return {
            "reply_form": form,
            "reply_url": reverse("admin:conversations_escalation_reply", args=[escalation.pk]),
            "thread_messages": Message.objects.filter(thread_id=escalation.thread_id).order_by("created_at"),
            "can_reply": escalation.status == Escalation.Status.CLAIMED
            and escalation.holder_id == request.user.pk,
            "may_claim": escalation.status == Escalation.Status.OPEN,
            "may_release": escalation.status == Escalation.Status.CLAIMED,
            "may_hand_back": escalation.status != Escalation.Status.RESOLVED,
            "inbox_url": reverse("admin:conversations_escalation_inbox") + f"?e={escalation.pk}",
        }

    def change_view(
        self,
        request: HttpRequest,
        object_id: str,
        form_url: str = "",
        extra_context: dict[str, Any] | None = None,
    ) -> HttpResponse:
        escalation = self.get_object(request, object_id)
        if escalation is not None:
            extra_context = {
                **(extra_context or {}),
                **self._reply_context(request, escalation, StaffReplyForm()),
                # Every field is read-only: the buttons above act, there is nothing to save.
                "show_save": False,
                "show_save_and_continue": False,
            }
        return super().change_view(request, object_id, form_url, extra_context)

    def reply_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST a staff reply; errors show in the form (nothing stored), success goes back to the page."""
        escalation = get_object_or_404(Escalation.objects.select_related("thread", "holder"), pk=object_id)
        change_url = reverse("admin:conversations_escalation_change", args=[escalation.pk])
        if not self.has_change_permission(request, escalation):
            raise PermissionDenied
        form = StaffReplyForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            try:
                staff_reply(
                    thread=escalation.thread, staff_user=request.user, content=form.cleaned_data["content"]
                )
            except (InvalidInput, PermissionError) as exc:
                form.add_error("content", str(exc))
            else:
                self.log_change(request, escalation, "Replied to the user.")
                self.message_user(request, "Reply sent.", level=messages.SUCCESS)
                return HttpResponseRedirect(change_url)
        context = {
            **self.admin_site.each_context(request),
            **self._reply_context(request, escalation, form),
            "opts": self.opts,
            "original": escalation,
            "title": f"Reply in {escalation.thread}",
            "change_url": change_url,
        }
        return TemplateResponse(request, "admin/conversations/escalation/reply.html", context)


@admin.register(AuditEvent)
class AuditEventAdmin(ConsoleModelAdmin):
    """The audit trail, read-only: nobody adds, edits or deletes a row here (append-only)."""

    list_display = (
        "created_at",
        "action",
        "actor_kind",
        "staff_username",
        "api_key_label",
        "subject",
        "target_type",
        "target_id",
        "ip",
        "route",
    )
    list_filter = (
        "action",
        "actor_kind",
        ("staff_user", admin.RelatedOnlyFieldListFilter),
        ("api_key", admin.RelatedOnlyFieldListFilter),
        "created_at",
    )
    search_fields = ("subject", "staff_username", "api_key_label", "target_id", "ip", "route")
    date_hierarchy = "created_at"
    readonly_fields = [f.name for f in AuditEvent._meta.fields]
    actions = None

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(Agent)
class AgentAdmin(ConsoleModelAdmin):
    """The agents of this deployment, as their builds registered them: read-only (they come from code
    and configuration). Each shows its effective configuration, where each value came from, and its
    intent categories' thresholds with their source."""

    list_display = ("name", "version", "origin", "rebuildable", "user_count", "last_built_at")
    search_fields = ("name",)
    fields = (
        "name",
        "version",
        "origin",
        "rebuildable",
        "code_parts",
        "effective",
        "thresholds",
        "last_built_at",
    )
    readonly_fields = fields

    def get_queryset(self, request: HttpRequest) -> QuerySet[Agent]:
        return super().get_queryset(request).annotate(n_users=Count("users"))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    @admin.display(description="users", ordering="n_users")
    def user_count(self, obj: Agent) -> int:
        return getattr(obj, "n_users", 0)

    @admin.display(description="rebuilt from its record", boolean=True)
    def rebuildable(self, obj: Agent) -> bool:
        return obj.portable

    @admin.display(description="effective configuration (value — source)")
    def effective(self, obj: Agent) -> SafeString:
        rows = [
            (path, json.dumps(value), obj.sources.get(path, "default"))
            for path, value in _flatten(obj.config)
        ]
        return format_html(
            "<table><tr><th>setting</th><th>value</th><th>source</th></tr>{}</table>",
            format_html_join("", "<tr><td>{}</td><td>{}</td><td>{}</td></tr>", rows),
        )

    @admin.display(description="intent thresholds (value — source)")
    def thresholds(self, obj: Agent) -> SafeString:
        from intents.selectors import intent_threshold_sources

        default = float(obj.config.get("confidence_config", {}).get("default_threshold", 0.5))
        rows = [
            (r["name"], r["threshold"], r["threshold_source"], "" if r["active"] else "(inactive)")
            for r in intent_threshold_sources(agent_id=obj.pk, default=default)
        ]
        return format_html(
            "<table>{}</table>", format_html_join("", "<tr><td>{}</td><td>{}</td><td>{} {}</td></tr>", rows)
        )


def _flatten(data: Any, prefix: str = "") -> list[tuple[str, Any]]:
    if isinstance(data, dict) and data and prefix != "confidence_config.intent_specific":
        items: list[tuple[str, Any]] = []
        for key, value in data.items():
            items.extend(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return items
    return [(prefix, data)]


@admin.register(CannedReply)
class CannedReplyAdmin(ConsoleModelAdmin):
    """Ready-made replies the inbox offers (per agent, or for all); 1-9 insert the first nine."""

    list_display = ("title", "agent", "position", "short_body")
    list_editable = ("position",)
    list_filter = ("agent",)
    search_fields = ("title", "body")

    @admin.display(description="reply")
    def short_body(self, obj: CannedReply) -> str:
        return Truncator(obj.body).chars(80)
