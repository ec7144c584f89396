from django.apps import AppConfig


class AgentflowConfig(AppConfig):
    name = "agentflow"
    verbose_name = "AgentFlow"

    def ready(self) -> None:
        from django.contrib import admin

        from . import signals  # noqa: F401  (clears cached agents when settings change in tests)
        from .conf import anthropic_api_key

        admin.site.site_header = "AgentFlow ops console"
        if not anthropic_api_key():
            admin.site.site_header += " — OFFLINE MODE: no ANTHROPIC_API_KEY, the bot offers humans"
        admin.site.site_title = "AgentFlow"
