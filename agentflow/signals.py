"""Forget cached agents and settings when the settings they were read from change (tests override them)."""

from django.core.signals import setting_changed
from django.dispatch import receiver

from .conf import conf_reset
from .registry import clear_agent_cache

_WATCHED = {"AGENTFLOW", "ANTHROPIC_API_KEY", "ANTHROPIC_BASE_URL"}


@receiver(setting_changed)
def _on_setting_changed(*, setting: str, **kwargs: object) -> None:
    if setting == "AGENTFLOW":
        conf_reset()
    if setting in _WATCHED:
        clear_agent_cache()
