"""Agents as records: every end user belongs to one agent; existing data moves to the default agent."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def default_agent_name() -> str:
    return getattr(settings, "AGENTFLOW", {}).get("DEFAULT_AGENT") or "agentflow"


def assign_default_agent(apps, schema_editor):
    Agent = apps.get_model("conversations", "Agent")
    EndUser = apps.get_model("conversations", "EndUser")
    if not EndUser.objects.exists():
        return
    agent, _ = Agent.objects.get_or_create(name=default_agent_name(), defaults={"origin": "migrated"})
    EndUser.objects.filter(agent__isnull=True).update(agent=agent)


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0006_audit_event"),
    ]

    operations = [
        migrations.CreateModel(
            name="Agent",
            fields=[
                ("id", models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name="ID")),
                (
                    "name",
                    models.CharField(
                        help_text="The configuration's name (e.g. my_support_agent); used in URLs and chat tokens.",
                        max_length=100,
                        unique=True,
                    ),
                ),
                ("config", models.JSONField(blank=True, default=dict, help_text="The validated configuration.")),
                (
                    "sources",
                    models.JSONField(
                        blank=True,
                        default=dict,
                        help_text="Where each explicitly set value came from (yaml, env, code...).",
                    ),
                ),
                ("fingerprint", models.CharField(blank=True, help_text="Hash of the code-side definition.", max_length=64)),
                ("version", models.PositiveIntegerField(default=1)),
                (
                    "code_parts",
                    models.JSONField(
                        blank=True,
                        default=dict,
                        help_text="Handlers, middleware and tools defined in code: a process must load them from code.",
                    ),
                ),
                (
                    "origin",
                    models.CharField(
                        blank=True,
                        help_text="Where the definition lives: an AGENTFLOW_AGENTS dotted path, or 'script'.",
                        max_length=200,
                    ),
                ),
                ("created_at", models.DateTimeField(auto_now_add=True)),
                ("updated_at", models.DateTimeField(auto_now=True)),
                ("last_built_at", models.DateTimeField(blank=True, null=True)),
            ],
            options={
                "ordering": ["name"],
                "constraints": [
                    models.CheckConstraint(
                        condition=models.Q(("name__regex", "^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")), name="agent_name_slug"
                    )
                ],
            },
        ),
        migrations.AddField(
            model_name="enduser",
            name="agent",
            field=models.ForeignKey(
                null=True, on_delete=django.db.models.deletion.PROTECT, related_name="users", to="conversations.agent"
            ),
        ),
        migrations.RunPython(assign_default_agent, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="enduser",
            name="agent",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.PROTECT, related_name="users", to="conversations.agent"
            ),
        ),
        migrations.AlterField(
            model_name="enduser",
            name="external_id",
            field=models.CharField(help_text="The host application's user id.", max_length=255),
        ),
        migrations.AddConstraint(
            model_name="enduser",
            constraint=models.UniqueConstraint(fields=("agent", "external_id"), name="enduser_unique_per_agent"),
        ),
        migrations.AddIndex(
            model_name="enduser",
            index=models.Index(fields=["external_id"], name="enduser_external_id_idx"),
        ),
        migrations.AddField(
            model_name="apikey",
            name="agent",
            field=models.ForeignKey(
                blank=True,
                help_text="Limit the key to this agent's users (empty: every agent).",
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="api_keys",
                to="conversations.agent",
            ),
        ),
    ]
