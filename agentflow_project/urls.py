"""The deployment's URLs: the landing page, the admin (with the analytics dashboard), and AgentFlow's routes
exactly as a host project includes them."""

from django.contrib import admin
from django.urls import include, path

from conversations import dashboard

from . import pages

urlpatterns = [
    path("", pages.landing, name="agentflow-home"),
    path("favicon.ico", pages.favicon, name="agentflow-favicon"),
    path("admin/analytics/", include(dashboard.urls())),
    path("admin/", admin.site.urls),
    path("", include("agentflow.web.urls")),
]
