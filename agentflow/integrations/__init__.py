"""The seed's integrations: Slack notifications and Jira issues (core: HTTP clients and settings).

The jobs and admin actions that use them, and write audit rows, live in the apps and transports.
"""

from .settings import JiraSettings, SlackSettings, check_integrations, jira_settings, slack_settings

__all__ = ["JiraSettings", "SlackSettings", "check_integrations", "jira_settings", "slack_settings"]
