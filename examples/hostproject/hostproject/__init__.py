"""A Django project that is not AgentFlow's: it installs the apps and includes their routes."""

from .celery import app as celery_app

__all__ = ["celery_app"]
