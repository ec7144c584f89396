from django.apps import AppConfig


class ConversationsConfig(AppConfig):
    name = "conversations"
    verbose_name = "Conversations"

    def ready(self) -> None:
        from celery import current_app
        from django.contrib.auth import signals

        from agentflow.limits import SWEEP_EVERY

        from . import audit, housekeeping, recovery

        # Celery beat (``agentflow_run`` starts the worker with -B) re-queues unanswered messages.
        current_app.conf.beat_schedule.setdefault(
            "conversations-recover-unanswered",
            {"task": recovery.RECOVER_TASK, "schedule": SWEEP_EVERY.total_seconds()},
        )
        # ... and marks expired sessions and idle threads (no turn does it for everyone).
        current_app.conf.beat_schedule.setdefault(
            "conversations-housekeeping",
            {
                "task": housekeeping.HOUSEKEEPING_TASK,
                "schedule": housekeeping.HOUSEKEEPING_EVERY.total_seconds(),
            },
        )

        # Staff logins, failed logins and logouts go to the audit trail.
        signals.user_logged_in.connect(audit.on_logged_in, dispatch_uid="agentflow.audit.login")
        signals.user_logged_out.connect(audit.on_logged_out, dispatch_uid="agentflow.audit.logout")
        signals.user_login_failed.connect(audit.on_login_failed, dispatch_uid="agentflow.audit.login_failed")
