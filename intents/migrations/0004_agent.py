"""Intent categories belong to one agent; existing ones move to the default agent."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def assign_default_agent(apps, schema_editor):
    Agent = apps.get_model("conversations", "Agent")
    IntentCategory = apps.get_model("intents", "IntentCategory")
    if not IntentCategory.objects.exists():
        return
    name = getattr(settings, "AGENTFLOW", {}).get("DEFAULT_AGENT") or "agentflow"
    agent, _ = Agent.objects.get_or_create(name=name, defaults={"origin": "migrated"})
    IntentCategory.objects.filter(agent__isnull=True).update(agent=agent)


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0007_agent"),
        ("intents", "0003_on_low_confidence"),
    ]

    operations = [
        migrations.AddField(
            model_name="intentcategory",
            name="agent",
            field=models.ForeignKey(
                null=True,
                on_delete=django.db.models.deletion.CASCADE,
                related_name="intent_categories",
                to="conversations.agent",
            ),
        ),
        migrations.RunPython(assign_default_agent, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="intentcategory",
            name="agent",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE,
                related_name="intent_categories",
                to="conversations.agent",
            ),
        ),
        migrations.AlterField(
            model_name="intentcategory",
            name="name",
            field=models.CharField(max_length=100),
        ),
        migrations.AddField(
            model_name="intentcategory",
            name="staff_edited",
            field=models.JSONField(
                blank=True,
                default=list,
                help_text="Fields staff changed in the admin: code no longer sets them (see docs/configuration.md).",
            ),
        ),
        migrations.AddConstraint(
            model_name="intentcategory",
            constraint=models.UniqueConstraint(fields=("agent", "name"), name="intent_unique_name_per_agent"),
        ),
    ]
