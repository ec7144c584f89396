"""The base of the console's model admins: the stock Django admin plus the console's stylesheet
(lists and forms that wrap to fit a 1280 px screen; see ``static/agentflow/console.css``)."""

from __future__ import annotations

from django.contrib import admin


class ConsoleModelAdmin(admin.ModelAdmin):
    class Media:
        css = {"all": ("agentflow/console.css",)}
