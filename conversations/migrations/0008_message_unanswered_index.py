"""A partial index for the recovery sweep (issue 11): the user messages not yet answered.

The sweep (``conversations.recovery``) looks for ``pending`` and ``processing`` user messages every
30 s; this index holds only those rows, so the query stays cheap however many messages are stored.
Raw SQL, so the model's state (and ``makemigrations``) is unchanged.
"""

from django.db import migrations


class Migration(migrations.Migration):
    dependencies = [("conversations", "0007_agent")]

    operations = [
        migrations.RunSQL(
            sql=(
                "CREATE INDEX IF NOT EXISTS conversations_message_unanswered"
                " ON conversations_message (created_at)"
                " WHERE role = 'user' AND status IN ('pending', 'processing')"
            ),
            reverse_sql="DROP INDEX IF EXISTS conversations_message_unanswered",
        )
    ]
