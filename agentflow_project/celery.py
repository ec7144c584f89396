"""The Celery application. Workers run with the threads pool: turns are LLM I/O bound."""

import os

from celery import Celery

from agentflow.worker import celery_setup

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "agentflow_project.settings")

app = Celery("agentflow")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
celery_setup(app)  # the worker heartbeat (readiness) and the worker's metrics
