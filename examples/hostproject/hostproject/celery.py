"""The host's Celery app: its own, with AgentFlow's worker steps added (heartbeat, metrics)."""

import os

from celery import Celery

from agentflow.worker import celery_setup

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "hostproject.settings")

app = Celery("hostproject")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()  # finds conversations.tasks and memory.tasks
celery_setup(app)
