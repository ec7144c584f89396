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
            # Short enough to stay on one line at 1280 px; the tooltip in base_site.html says why.
            admin.site.site_header += " — OFFLINE MODE"
        admin.site.site_title = "AgentFlow"
