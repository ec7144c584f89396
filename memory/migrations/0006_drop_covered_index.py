"""Drop ``memory_memory.user_id``'s own index: the (user_id, kind) index starts with the same column and
serves the same lookups and foreign-key deletes, while each index is written on every memory insert
(conversations 0012 did the same for the conversation tables; docs/operations.md, "PostgreSQL's CPU
per turn on the production path"). The field's ``db_index=False`` goes into the migration state only:
Django's own ``AlterField`` for a foreign key would also drop and re-create the constraint.
"""

import django.db.models.deletion
from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("memory", "0005_agent"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    sql='DROP INDEX IF EXISTS "memory_memory_user_id_1f05b3bb"',
                    reverse_sql='CREATE INDEX IF NOT EXISTS "memory_memory_user_id_1f05b3bb"'
                    ' ON "memory_memory" ("user_id")',
                )
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="memory",
                    name="user",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="memories",
                        to="conversations.enduser",
                    ),
                ),
            ],
        ),
    ]
