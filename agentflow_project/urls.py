"""The deployment's URLs: the admin, and AgentFlow's routes exactly as a host project includes them."""

from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("", include("agentflow.web.urls")),
]
