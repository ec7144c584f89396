"""Load the seed's support-agent demo: intent categories, an admin login and an API key."""

from __future__ import annotations

import secrets
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser

from agentflow.conf import conf
from agentflow.types import IntentCategory as Spec
from conversations.agents import agent_get_or_create
from conversations.models import ApiKey
from conversations.services import api_key_create
from intents.models import IntentCategory
from intents.services import intent_categories_sync

DEMO_CATEGORIES = [
    Spec(
        "QUERY",
        "General questions about using the product",
        [
            "How do I reset my password?",
            "What is the API rate limit?",
            "How do I invite a teammate?",
            "Where can I find my invoices?",
            "How do I configure S3 backups?",
        ],
        threshold=0.5,
    ),
    Spec(
        "OUTAGE",
        "Production issues: something is down or erroring",
        [
            "Service is down",
            "Error 500 on every request",
            "The dashboard won't load",
            "My login is broken",
            "Deploys are failing since this morning",
        ],
        threshold=0.7,
    ),
    Spec(
        "ESCALATION",
        "Urgent issues that need a human now",
        [
            "Critical: production down",
            "I want to speak to a manager",
            "This is urgent, data loss",
            "Security incident, we were breached",
        ],
        threshold=0.0,
        handoff=True,
    ),
]


class Command(BaseCommand):
    help = "Create the demo intent categories, an admin user and an API key (idempotent)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--admin-user", default="admin")
        parser.add_argument("--admin-password", default=None, help="default: a random one, printed")

    def handle(self, *args: Any, admin_user: str, admin_password: str | None, **options: Any) -> None:
        agent = agent_get_or_create(name=conf().DEFAULT_AGENT)
        created = intent_categories_sync(agent=agent, categories=DEMO_CATEGORIES)
        count = IntentCategory.objects.filter(agent=agent).count()
        self.stdout.write(f"agent {agent.name}: {created} intent categories created, {count} in all")
        User = get_user_model()
        user = User.objects.filter(username=admin_user).first()
        if user is None or admin_password:
            password = admin_password or secrets.token_urlsafe(12)
            if user is None:
                User.objects.create_superuser(admin_user, f"{admin_user}@example.com", password)
            else:
                user.set_password(password)
                user.save(update_fields=["password"])
            self.stdout.write(self.style.SUCCESS(f"admin login: {admin_user} / {password}"))
        else:
            self.stdout.write(f"admin login: {admin_user} (exists; pass --admin-password to reset it)")
        if not ApiKey.objects.filter(name="demo").exists():
            _, plain = api_key_create(name="demo")
            self.stdout.write(self.style.SUCCESS(f"API key (X-API-Key): {plain}"))
        else:
            self.stdout.write("API key 'demo' exists (make a new one in the admin)")
