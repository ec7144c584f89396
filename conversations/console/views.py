"""The hand-off inbox's admin views: the page, the one-click escalation actions and the reply form.

They are registered by ``EscalationAdmin.get_urls`` through ``admin_site.admin_view``, so Django's
admin login applies; each view then checks the escalation admin's own permissions (view to look,
change to act). Every action goes through the hand-off services; a refusal (already claimed, held
by someone else) is shown as an error and changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from urllib.parse import urlencode

from django import forms
from django.contrib import messages
from django.contrib.admin import ModelAdmin
from django.core.exceptions import PermissionDenied
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_POST

from agentflow.errors import InvalidInput

from ..handoff import (
    STAFF_REPLY_MAX_CHARS,
    escalation_claim,
    escalation_release,
    escalation_resolve,
    staff_reply,
)
from ..live import may_act
from ..models import Escalation, Thread
from ..services import thread_staff_resolve
from .queue import SHOW, inbox_counts, inbox_detail, inbox_rows, sla_minutes


def _hand_back_and_resolve(*, escalation: Escalation, staff_user: Any) -> Escalation:
    """Hand the thread back to the bot and mark it resolved (the user's question is answered)."""
    escalation = escalation_resolve(escalation=escalation, staff_user=staff_user)
    thread_staff_resolve(
        thread=escalation.thread, staff_user=staff_user, note="resolved by staff in the inbox"
    )
    return escalation


ACTIONS: dict[str, tuple[Callable[..., Escalation], str]] = {
    "claim": (escalation_claim, "Claimed"),
    "release": (escalation_release, "Released"),
    "hand_back": (escalation_resolve, "Handed back to the bot"),
    "resolve": (_hand_back_and_resolve, "Handed back and resolved"),
}


class InboxReplyForm(forms.Form):
    content = forms.CharField(max_length=STAFF_REPLY_MAX_CHARS, strip=False)


def _inbox_url(*, show: str = "all", selected: int | None = None) -> str:
    query = {"show": show} if show != "all" else {}
    if selected is not None:
        query["e"] = str(selected)
    url = reverse("admin:conversations_escalation_inbox")
    return f"{url}?{urlencode(query)}" if query else url


def _show(value: Any) -> str:
    return value if value in SHOW else "all"


def _selected(request: HttpRequest) -> Escalation | None:
    raw = request.GET.get("e", "")
    if not raw.isdigit() or len(raw) > 18:
        return None
    return (
        Escalation.objects.select_related("thread", "user__agent", "holder", "message").filter(pk=raw).first()
    )


def inbox_view(request: HttpRequest, model_admin: ModelAdmin) -> HttpResponse:
    """The inbox page: the rows on the left, the selected escalation's conversation on the right."""
    if not model_admin.has_view_permission(request):
        raise PermissionDenied
    show = _show(request.GET.get("show"))
    rows = inbox_rows(staff_user=request.user, show=show)
    selected = _selected(request)
    if selected is None and rows and "e" not in request.GET:
        selected = (
            Escalation.objects.select_related("thread", "user__agent", "holder", "message")
            .filter(pk=rows[0]["id"])
            .first()
        )
    warn, breach = sla_minutes()
    context = {
        **model_admin.admin_site.each_context(request),
        "opts": model_admin.opts,
        "title": "Inbox",
        "rows": rows,
        "show": show,
        "filters": [
            ("all", "All"),
            ("open", "Open"),
            ("mine", "Claimed by me"),
            ("waiting", "Waiting for a reply"),
        ],
        "counts": inbox_counts(staff_user=request.user),
        "selected": selected,
        "detail": inbox_detail(escalation=selected, staff_user=request.user) if selected else None,
        "may_act": may_act(request.user) and model_admin.has_change_permission(request),
        "sla_warn": warn,
        "sla_breach": breach,
        "inbox_config": {
            "queuePath": "/ws/staff/queue/",
            "userPath": f"/ws/staff/users/{selected.user_id}/" if selected else None,
            "selected": selected.pk if selected else None,
            "threadId": str(selected.thread_id) if selected else None,
            "maxChars": STAFF_REPLY_MAX_CHARS,
            "timeZone": timezone.get_current_timezone_name(),
            "inboxUrl": reverse("admin:conversations_escalation_inbox"),
            "show": show,
        },
    }
    return TemplateResponse(request, "admin/conversations/inbox.html", context)


def _next_url(request: HttpRequest, escalation: Escalation) -> str:
    if request.POST.get("next") == "change":
        return reverse("admin:conversations_escalation_change", args=[escalation.pk])
    return _inbox_url(show=_show(request.POST.get("show")), selected=escalation.pk)


def _escalation_for_action(request: HttpRequest, model_admin: ModelAdmin, object_id: str) -> Escalation:
    if not object_id.isdigit() or len(object_id) > 18:
        raise Http404("no such escalation")
    escalation = Escalation.objects.select_related("thread").filter(pk=object_id).first()
    if escalation is None:
        raise Http404("no such escalation")
    if not (may_act(request.user) and model_admin.has_change_permission(request, escalation)):
        raise PermissionDenied
    return escalation


@require_POST
def inbox_action(request: HttpRequest, model_admin: ModelAdmin, object_id: str, action: str) -> HttpResponse:
    """Claim, release, hand back or resolve one escalation (POST with the CSRF token)."""
    if action not in ACTIONS:
        raise Http404("no such action")
    escalation = _escalation_for_action(request, model_admin, object_id)
    service, done = ACTIONS[action]
    try:
        service(escalation=escalation, staff_user=request.user)
    except (InvalidInput, PermissionError) as exc:
        messages.error(request, f"Escalation {escalation.pk}: {exc}.")
    else:
        model_admin.log_change(request, escalation, f"{done}.")
        messages.success(request, f"{done}: escalation {escalation.pk}.")
    return HttpResponseRedirect(_next_url(request, escalation))


@require_POST
def inbox_reply(request: HttpRequest, model_admin: ModelAdmin, object_id: str) -> HttpResponse:
    """The reply box without JavaScript (with it, the page replies over the staff WebSocket)."""
    escalation = _escalation_for_action(request, model_admin, object_id)
    form = InboxReplyForm(request.POST)
    if not form.is_valid():
        messages.error(request, f"Write a reply of at most {STAFF_REPLY_MAX_CHARS} characters.")
        return HttpResponseRedirect(_next_url(request, escalation))
    thread = Thread.objects.get(pk=escalation.thread_id)
    try:
        staff_reply(thread=thread, staff_user=request.user, content=form.cleaned_data["content"])
    except (InvalidInput, PermissionError) as exc:
        messages.error(request, f"Reply not sent: {exc}.")
    else:
        model_admin.log_change(request, escalation, "Replied to the user.")
        messages.success(request, "Reply sent.")
    return HttpResponseRedirect(_next_url(request, escalation))
