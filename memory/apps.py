from django.apps import AppConfig

SWEEP_SECONDS = 600.0  # memory.tasks.SWEEP_EVERY


class MemoryConfig(AppConfig):
    name = "memory"
    verbose_name = "Memory"

    def ready(self) -> None:
        # Celery beat (``agentflow_run`` starts the worker with -B) remembers sessions that expired
        # without the user coming back; nothing else would notice them.
        from celery import current_app

        current_app.conf.beat_schedule.setdefault(
            "memory-sweep-ended-sessions", {"task": "memory.sweep_ended_sessions", "schedule": SWEEP_SECONDS}
        )
