"""Memories belong to one agent (global ones too); existing ones follow their user, else the default agent."""

import django.db.models.deletion
from django.conf import settings
from django.db import migrations, models


def assign_agents(apps, schema_editor):
    Agent = apps.get_model("conversations", "Agent")
    Memory = apps.get_model("memory", "Memory")
    EndUser = apps.get_model("conversations", "EndUser")
    if not Memory.objects.exists():
        return
    Memory.objects.filter(user__isnull=False).update(
        agent_id=models.Subquery(EndUser.objects.filter(pk=models.OuterRef("user_id")).values("agent_id")[:1])
    )
    if Memory.objects.filter(agent__isnull=True).exists():
        name = getattr(settings, "AGENTFLOW", {}).get("DEFAULT_AGENT") or "agentflow"
        agent, _ = Agent.objects.get_or_create(name=name, defaults={"origin": "migrated"})
        Memory.objects.filter(agent__isnull=True).update(agent=agent)


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0007_agent"),
        ("memory", "0004_global_vectors_covering"),
    ]

    operations = [
        migrations.AddField(
            model_name="memory",
            name="agent",
            field=models.ForeignKey(
                null=True, on_delete=django.db.models.deletion.CASCADE, related_name="memories", to="conversations.agent"
            ),
        ),
        migrations.RunPython(assign_agents, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="memory",
            name="agent",
            field=models.ForeignKey(
                on_delete=django.db.models.deletion.CASCADE, related_name="memories", to="conversations.agent"
            ),
        ),
        migrations.RemoveIndex(model_name="memory", name="memory_global_vectors"),
        migrations.AddIndex(
            model_name="memory",
            index=models.Index(
                condition=models.Q(("approved", True), ("user__isnull", True)),
                fields=["agent", "id"],
                include=("embedding",),
                name="memory_global_vectors",
            ),
        ),
    ]
