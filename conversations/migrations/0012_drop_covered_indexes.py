"""Drop seven single-column indexes that a composite index starting with the same column covers.

Each index is written on every insert and on every update that changes an indexed column, so these
cost PostgreSQL work and WAL on every turn (docs/operations.md, "PostgreSQL's CPU per turn on the
production path"); the covering index serves the same lookups, foreign-key deletes and orderings:

    enduser.agent_id            enduser_unique_per_agent (agent_id, external_id)
    chatsession.user_id         (user_id, last_activity_at DESC)
    thread.user_id              (user_id, status, last_activity_at DESC)
    message.user_id             (user_id, created_at)
    message.thread_id           (thread_id, created_at)
    message.created_at          message_analytics_idx (created_at) INCLUDE (...)
    threadactivity.thread_id    (thread_id, created_at)

The fields' ``db_index=False`` goes into the migration state only: Django's own ``AlterField`` for a
foreign key would also drop and re-create the constraint, checking every row of the table again.
``DROP INDEX`` itself is quick but waits for the table's running statements.
"""

import django.db.models.deletion
from django.db import migrations, models

# (index, table, column): the names Django gave them (0001_initial).
DROPPED = [
    ("conversations_enduser_agent_id_35d19771", "conversations_enduser", "agent_id"),
    ("conversations_chatsession_user_id_2c088c3b", "conversations_chatsession", "user_id"),
    ("conversations_thread_user_id_96319419", "conversations_thread", "user_id"),
    ("conversations_message_user_id_a91d73be", "conversations_message", "user_id"),
    ("conversations_message_thread_id_2e6e7032", "conversations_message", "thread_id"),
    ("conversations_message_created_at_47ab5c7e", "conversations_message", "created_at"),
    ("conversations_threadactivity_thread_id_3b24824f", "conversations_threadactivity", "thread_id"),
]


class Migration(migrations.Migration):
    dependencies = [
        ("conversations", "0011_analytics_indexes"),
    ]

    operations = [
        migrations.SeparateDatabaseAndState(
            database_operations=[
                migrations.RunSQL(
                    sql=f'DROP INDEX IF EXISTS "{index}"',
                    reverse_sql=f'CREATE INDEX IF NOT EXISTS "{index}" ON "{table}" ("{column}")',
                )
                for index, table, column in DROPPED
            ],
            state_operations=[
                migrations.AlterField(
                    model_name="chatsession",
                    name="user",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="sessions",
                        to="conversations.enduser",
                    ),
                ),
                migrations.AlterField(
                    model_name="enduser",
                    name="agent",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.PROTECT,
                        related_name="users",
                        to="conversations.agent",
                    ),
                ),
                migrations.AlterField(
                    model_name="message",
                    name="created_at",
                    field=models.DateTimeField(auto_now_add=True),
                ),
                migrations.AlterField(
                    model_name="message",
                    name="thread",
                    field=models.ForeignKey(
                        blank=True,
                        db_index=False,
                        null=True,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="messages",
                        to="conversations.thread",
                    ),
                ),
                migrations.AlterField(
                    model_name="message",
                    name="user",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="messages",
                        to="conversations.enduser",
                    ),
                ),
                migrations.AlterField(
                    model_name="thread",
                    name="user",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="threads",
                        to="conversations.enduser",
                    ),
                ),
                migrations.AlterField(
                    model_name="threadactivity",
                    name="thread",
                    field=models.ForeignKey(
                        db_index=False,
                        on_delete=django.db.models.deletion.CASCADE,
                        related_name="activities",
                        to="conversations.thread",
                    ),
                ),
            ],
        ),
    ]
