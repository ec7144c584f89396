"""The Celery application. Workers run with the threads pool: turns are LLM I/O bound."""

import os

from celery import Celery

from agentflow_project.heartbeat import WorkerHeartbeat

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")

app = Celery("agentflow")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
app.steps["worker"].add(WorkerHeartbeat)  # the readiness probe's worker heartbeat
