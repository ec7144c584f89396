from django.apps import AppConfig


class AgentflowProjectConfig(AppConfig):
    """The deployment project as an app: its commands, and its embedded servers started on setup."""

    name = "agentflow_project"
    verbose_name = "AgentFlow deployment"

    def ready(self) -> None:
        from . import runtime

        runtime.ensure_services()
