"""End users, their chat sessions, threads and messages, and the API keys of host backends."""

from __future__ import annotations

import uuid
from typing import Any

from django.conf import settings
from django.db import models
from django.db.models import Q

from agentflow.vectors import VectorField

EMBEDDING_DIMENSIONS = 384

# A staff account (settings.AUTH_USER_MODEL, as request.user or a channels scope gives it); the
# admin and the staff socket let only authenticated staff through to the services that take one.
StaffUser = Any


AGENT_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class Agent(models.Model):
    """A configured agent of this deployment: the record every process rebuilds it from.

    ``build()`` registers or updates it by name. Every end user, and through them every session,
    thread, message, escalation and episodic memory, belongs to one agent; so do intent categories
    and global memories. ``config`` is the validated configuration (secrets in ``tools_config`` are
    not stored); ``fingerprint`` hashes the code-side definition (categories, handlers, middleware,
    tools), and ``version`` goes up whenever either changes, so processes know a cached agent is stale.
    """

    name = models.CharField(
        max_length=100,
        unique=True,
        help_text="The configuration's name (e.g. my_support_agent); used in URLs and chat tokens.",
    )
    config = models.JSONField(default=dict, blank=True, help_text="The validated configuration.")
    sources = models.JSONField(
        default=dict, blank=True, help_text="Where each explicitly set value came from (yaml, env, code...)."
    )
    fingerprint = models.CharField(max_length=64, blank=True, help_text="Hash of the code-side definition.")
    version = models.PositiveIntegerField(default=1)
    code_parts = models.JSONField(
        default=dict,
        blank=True,
        help_text="Handlers, middleware and tools defined in code: a process must load them from code.",
    )
    origin = models.CharField(
        max_length=200,
        blank=True,
        help_text="Where the definition lives: an AGENTFLOW_AGENTS dotted path, or 'script'.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)
    last_built_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(condition=Q(name__regex=AGENT_NAME_PATTERN), name="agent_name_slug"),
        ]

    def __str__(self) -> str:
        return self.name

    @property
    def portable(self) -> bool:
        """Whether its stored configuration alone rebuilds it faithfully (nothing defined in code)."""
        return not any(self.code_parts.get(k) for k in ("handlers", "middleware", "tools"))


class EndUser(models.Model):
    """A person chatting with one agent, known by the host application's stable id.

    End users are not Django accounts: the host site owns their identity. The same person talking to
    two agents has two rows, so nothing of one agent's conversation is ever a candidate for another's;
    export and erase act on every row of an external id.
    """

    # No index of its own: the unique (agent, external_id) index starts with it (see Message.user).
    agent = models.ForeignKey(Agent, on_delete=models.PROTECT, related_name="users", db_index=False)
    external_id = models.CharField(max_length=255, help_text="The host application's user id.")
    display_name = models.CharField(max_length=255, blank=True)
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_seen_at = models.DateTimeField(null=True, blank=True)
    last_read_message_id = models.UUIDField(
        null=True, blank=True, help_text="The latest message the user's widget has shown (its read position)."
    )
    last_read_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-last_seen_at"]
        constraints = [
            models.UniqueConstraint(fields=["agent", "external_id"], name="enduser_unique_per_agent"),
        ]
        indexes = [models.Index(fields=["external_id"], name="enduser_external_id_idx")]

    def __str__(self) -> str:
        return self.external_id


class ChatSession(models.Model):
    """A run of conversation; it expires ``ttl_seconds`` after the user's last message."""

    class Status(models.TextChoices):
        ACTIVE = "active"
        EXPIRED = "expired"
        ENDED = "ended"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Indexed by the (user, -last_activity_at) index (see Message.user).
    user = models.ForeignKey(EndUser, on_delete=models.CASCADE, related_name="sessions", db_index=False)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.ACTIVE)
    ttl_seconds = models.PositiveIntegerField()
    started_at = models.DateTimeField(auto_now_add=True)
    last_activity_at = models.DateTimeField()
    expires_at = models.DateTimeField()
    ended_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-last_activity_at"]
        indexes = [models.Index(fields=["user", "-last_activity_at"])]

    def __str__(self) -> str:
        return f"session {self.id} of {self.user_id}"


class Thread(models.Model):
    """One topic inside a user's conversation (a login problem, a billing question...)."""

    class Status(models.TextChoices):
        OPEN = "open"
        DORMANT = "dormant"
        RESOLVED = "resolved"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # Indexed by the (user, status, -last_activity_at) index (see Message.user).
    user = models.ForeignKey(EndUser, on_delete=models.CASCADE, related_name="threads", db_index=False)
    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="threads")
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    topic = models.CharField(max_length=255, blank=True, help_text="Short label: the opening message.")
    intent = models.CharField(max_length=100, blank=True)
    topic_embedding = VectorField(
        dimensions=EMBEDDING_DIMENSIONS,
        null=True,
        blank=True,
        help_text="Mean of the user messages' embeddings.",
    )
    topic_weight = models.PositiveIntegerField(default=0, help_text="User messages folded into the topic.")
    opening_embedding = VectorField(dimensions=EMBEDDING_DIMENSIONS, null=True, blank=True)
    last_user_embedding = VectorField(dimensions=EMBEDDING_DIMENSIONS, null=True, blank=True)
    vocabulary = models.JSONField(default=list, blank=True, help_text="Content words seen in the thread.")
    last_assistant_text = models.TextField(blank=True)
    escalated = models.BooleanField(default=False)
    opened_at = models.DateTimeField(auto_now_add=True)
    last_activity_at = models.DateTimeField()
    resolved_at = models.DateTimeField(null=True, blank=True)
    resolution = models.TextField(blank=True)

    class Meta:
        ordering = ["-last_activity_at"]
        indexes = [
            models.Index(fields=["user", "status", "-last_activity_at"]),
            # The analytics dashboard (conversations.analytics): index-only scans by day.
            models.Index(
                fields=["opened_at"],
                include=["id", "user", "status", "escalated", "intent", "topic", "last_activity_at"],
                name="thread_analytics_idx",
            ),
        ]

    def __str__(self) -> str:
        return self.topic or str(self.id)


class Message(models.Model):
    """One message in a thread. User messages carry the turn's decisions (thread, intent)."""

    class Role(models.TextChoices):
        USER = "user"
        ASSISTANT = "assistant"
        HUMAN_AGENT = "human_agent", "human agent"
        SYSTEM = "system"

    class Status(models.TextChoices):
        PENDING = "pending"  # stored, turn not run yet
        PROCESSING = "processing"  # a worker holds the turn
        DONE = "done"
        FAILED = "failed"

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    # A foreign key gets an index of its own unless told otherwise; user, thread and created_at need
    # none: the (user, created_at), (thread, created_at) and analytics (created_at) indexes start with
    # them and serve the same lookups, deletes and orderings. Every index is written on each insert and
    # each update that changes an indexed column (a message's status and thread do), so each one fewer
    # saves PostgreSQL work and WAL on every turn (docs/operations.md, "PostgreSQL's CPU per turn on
    # the production path").
    user = models.ForeignKey(EndUser, on_delete=models.CASCADE, related_name="messages", db_index=False)
    session = models.ForeignKey(ChatSession, on_delete=models.CASCADE, related_name="messages")
    thread = models.ForeignKey(
        Thread, on_delete=models.CASCADE, related_name="messages", null=True, blank=True, db_index=False
    )
    reply_to = models.OneToOneField(
        "self", on_delete=models.CASCADE, null=True, blank=True, related_name="reply"
    )
    role = models.CharField(max_length=16, choices=Role.choices)
    content = models.TextField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DONE)
    client_message_id = models.CharField(max_length=100, blank=True, default="")
    thread_event = models.CharField(max_length=20, blank=True)
    thread_confidence = models.FloatField(null=True, blank=True)
    thread_signals = models.JSONField(default=dict, blank=True)
    intent = models.CharField(max_length=100, blank=True)
    confidence = models.FloatField(null=True, blank=True)
    intent_candidates = models.JSONField(default=list, blank=True)
    escalated = models.BooleanField(default=False)
    offline = models.BooleanField(default=False)
    model = models.CharField(max_length=100, blank=True)
    usage = models.JSONField(default=dict, blank=True)
    latency_ms = models.FloatField(null=True, blank=True, help_text="Whole turn, on the reply.")
    llm_latency_ms = models.FloatField(null=True, blank=True)
    handled_by = models.CharField(max_length=100, blank=True, help_text="llm, handler:<intent>, offline...")
    processing_started_at = models.DateTimeField(null=True, blank=True)
    memories_used = models.JSONField(default=list, blank=True)
    tool_calls = models.JSONField(default=list, blank=True)
    error = models.TextField(blank=True)
    created_at = models.DateTimeField(auto_now_add=True)  # indexed by message_analytics_idx

    class Meta:
        ordering = ["created_at"]
        indexes = [
            models.Index(fields=["thread", "created_at"]),
            models.Index(fields=["user", "created_at"]),
            # The analytics dashboard (conversations.analytics): index-only scans by day, for all
            # messages and for the bot's replies (model, tokens, LLM latency).
            models.Index(
                fields=["created_at"],
                include=["user", "role", "status", "offline", "intent"],
                name="message_analytics_idx",
            ),
            models.Index(
                fields=["created_at"],
                include=["user", "model", "offline", "llm_latency_ms", "usage"],
                condition=Q(role="assistant"),
                name="message_reply_analytics_idx",
            ),
        ]
        constraints = [
            models.UniqueConstraint(
                fields=["user", "client_message_id"],
                condition=~Q(client_message_id=""),
                name="message_unique_client_id_per_user",
            ),
            models.CheckConstraint(
                condition=Q(confidence__isnull=True) | Q(confidence__gte=0, confidence__lte=1),
                name="message_confidence_in_unit_interval",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.role}: {self.content[:60]}"


class ThreadActivity(models.Model):
    """One event in a thread's life (opened, resolved, merged...), kept with its time for analytics.

    The user's turns record theirs as they are placed; staff actions in the admin record theirs with
    the staff account that took them.
    """

    class Kind(models.TextChoices):
        OPENED = "opened"
        FOLLOW_UP = "follow_up", "follow-up"
        RETURNED = "returned"
        RESOLVED = "resolved"
        REOPENED = "reopened"
        DORMANT = "dormant"
        MERGED = "merged"
        SPLIT = "split"

    class Actor(models.TextChoices):
        USER = "user"
        STAFF = "staff"
        SYSTEM = "system"

    # Indexed by the (thread, created_at) index (see Message.user).
    thread = models.ForeignKey(Thread, on_delete=models.CASCADE, related_name="activities", db_index=False)
    user = models.ForeignKey(EndUser, on_delete=models.CASCADE, related_name="thread_activities")
    kind = models.CharField(max_length=16, choices=Kind.choices)
    message = models.ForeignKey(Message, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    actor = models.CharField(max_length=8, choices=Actor.choices, default=Actor.SYSTEM)
    staff_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    detail = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["created_at"]
        verbose_name_plural = "thread activities"
        indexes = [models.Index(fields=["thread", "created_at"])]

    def __str__(self) -> str:
        return f"{self.kind} ({self.actor}) on {self.thread_id}"


class ApiKey(models.Model):
    """A key a host backend uses for the REST API. Only its hash is stored."""

    name = models.CharField(max_length=100, unique=True)
    prefix = models.CharField(max_length=12, db_index=True)
    key_hash = models.CharField(max_length=64, unique=True)
    agent = models.ForeignKey(
        Agent,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="api_keys",
        help_text="Limit the key to this agent's users (empty: every agent).",
    )
    active = models.BooleanField(default=True)
    created_at = models.DateTimeField(auto_now_add=True)
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        verbose_name = "API key"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class Escalation(models.Model):
    """A thread handed to a human: the hand-off queue's entry, from the turn that asked for it.

    While an escalation is unresolved (open or claimed) the bot stays silent in its thread; at most
    one per thread is unresolved at a time.
    """

    class Status(models.TextChoices):
        OPEN = "open"  # waiting in the queue for a staff member
        CLAIMED = "claimed"  # a staff member holds the thread
        RESOLVED = "resolved"  # handed back to the bot

    thread = models.ForeignKey(Thread, on_delete=models.CASCADE, related_name="escalations")
    user = models.ForeignKey(EndUser, on_delete=models.CASCADE, related_name="escalations")
    message = models.ForeignKey(
        Message,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The user message whose turn asked for a human.",
    )
    reason = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.OPEN)
    holder = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        on_delete=models.SET_NULL,
        null=True,
        blank=True,
        related_name="+",
        help_text="The staff member holding the thread (the last one, once resolved).",
    )
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    claimed_at = models.DateTimeField(null=True, blank=True)
    resolved_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["created_at"]
        indexes = [models.Index(fields=["status", "created_at"])]
        constraints = [
            models.UniqueConstraint(
                fields=["thread"],
                condition=~Q(status="resolved"),
                name="escalation_one_unresolved_per_thread",
            ),
        ]

    def __str__(self) -> str:
        return f"escalation {self.pk} ({self.status}) of {self.thread_id}"


class AuditQuerySet(models.QuerySet["AuditEvent"]):
    """Audit rows are append-only: the ORM refuses bulk updates and deletes.

    The one exception is ``conversations.audit.audit_forget_subject`` (erasing an end user strips
    their personal data from the rows about them), which goes through ``_scrub``.
    """

    def update(self, **kwargs: object) -> int:
        raise PermissionError("audit events are append-only")

    def delete(self) -> tuple[int, dict[str, int]]:
        raise PermissionError("audit events are append-only")

    def _scrub(self, **kwargs: object) -> int:
        return super().update(**kwargs)


class AuditEvent(models.Model):
    """One security-relevant action: who (staff, API key, system, end user) did what to what, when.

    Append-only (see ``AuditQuerySet``); written by ``conversations.audit.audit_record`` only.
    """

    class Actor(models.TextChoices):
        STAFF = "staff"
        API_KEY = "api_key", "API key"
        SYSTEM = "system"
        END_USER = "end_user", "end user"
        ANONYMOUS = "anonymous"

    class Action(models.TextChoices):
        LOGIN = "login"
        LOGIN_FAILED = "login_failed", "login failed"
        LOGOUT = "logout"
        API_CALL = "api_call", "API call"
        API_AUTH_FAILED = "api_auth_failed", "API key refused"
        API_KEY_CREATE = "api_key_create", "API key created"
        API_KEY_CHANGE = "api_key_change", "API key changed"
        ESCALATION_CLAIM = "escalation_claim", "escalation claimed"
        ESCALATION_RELEASE = "escalation_release", "escalation released"
        ESCALATION_HAND_BACK = "escalation_hand_back", "escalation handed back"
        STAFF_REPLY = "staff_reply", "staff reply"
        THREAD_RESOLVE = "thread_resolve", "thread resolved"
        THREAD_REOPEN = "thread_reopen", "thread reopened"
        THREAD_MERGE = "thread_merge", "threads merged"
        THREAD_SPLIT = "thread_split", "thread split"
        MEMORY_APPROVE = "memory_approve", "memory approved"
        MEMORY_WITHDRAW = "memory_withdraw", "memory withdrawn"
        CATEGORY_CREATE = "category_create", "intent category created"
        CATEGORY_CHANGE = "category_change", "intent category changed"
        USER_EXPORT = "user_export", "user exported"
        USER_ERASE = "user_erase", "user erased"
        SLACK_NOTIFY = "slack_notify", "Slack notification"
        JIRA_ISSUE = "jira_issue", "Jira issue"

    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    actor_kind = models.CharField(max_length=16, choices=Actor.choices)
    staff_user = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.SET_NULL, null=True, blank=True, related_name="+"
    )
    staff_username = models.CharField(max_length=150, blank=True, help_text="Kept if the account goes.")
    api_key = models.ForeignKey(ApiKey, on_delete=models.SET_NULL, null=True, blank=True, related_name="+")
    api_key_label = models.CharField(max_length=120, blank=True, help_text="The key's name and prefix.")
    action = models.CharField(max_length=32, choices=Action.choices, db_index=True)
    target_type = models.CharField(max_length=32, blank=True)
    target_id = models.CharField(max_length=64, blank=True)
    subject = models.CharField(
        max_length=255, blank=True, db_index=True, help_text="The end user concerned (their external id)."
    )
    subject_hash = models.CharField(
        max_length=64, blank=True, help_text="Keyed hash of an erased user's id (the erase event only)."
    )
    ip = models.GenericIPAddressField(null=True, blank=True)
    route = models.CharField(max_length=255, blank=True)
    detail = models.JSONField(default=dict, blank=True)

    objects = AuditQuerySet.as_manager()

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["actor_kind", "created_at"])]

    def __str__(self) -> str:
        who = self.staff_username or self.api_key_label or self.actor_kind
        return f"{self.action} by {who}"

    def save(self, *args: object, **kwargs: object) -> None:
        if not self._state.adding:
            raise PermissionError("audit events are append-only")
        super().save(*args, **kwargs)  # type: ignore[arg-type]

    def delete(self, *args: object, **kwargs: object) -> tuple[int, dict[str, int]]:
        raise PermissionError("audit events are append-only")


class CannedReply(models.Model):
    """A ready-made staff reply, per agent (none: every agent's), inserted into the inbox's reply box."""

    agent = models.ForeignKey(
        Agent,
        on_delete=models.CASCADE,
        null=True,
        blank=True,
        related_name="canned_replies",
        help_text="Empty: offered for every agent.",
    )
    title = models.CharField(max_length=100)
    body = models.TextField(max_length=4000)
    position = models.PositiveSmallIntegerField(default=0, help_text="Lower first; 1-9 are shortcuts.")

    class Meta:
        ordering = ["position", "title"]
        verbose_name_plural = "canned replies"

    def __str__(self) -> str:
        return self.title
