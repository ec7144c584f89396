"""Drop ``intents_intentcategory.agent_id``'s own index: the unique (agent_id, name) index starts with the
same column and serves the same lookups and foreign-key deletes (conversations 0012 did the same for
the conversation tables). The field's ``db_index=False`` goes into the migration state only: Django's
own ``AlterField`` for a foreign key would also drop and re-create the constraint.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("intents", "0004_agent"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    sql='DROP INDEX IF EXISTS "intents_intentcategory_agent_id_5551681c"',
                    reverse_sql='CREATE INDEX IF NOT EXISTS "intents_intentcategory_agent_id_5551681c"'
                    ' ON "intents_intentcategory" ("agent_id")',
                )
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="intentcategory",
                    name="agent",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="intent_categories",
                        to="conversations.agent",
                    ),
                ),
            ],
        ),
    ]
