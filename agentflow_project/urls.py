from django.contrib import admin
from django.urls import include, path

from conversations import dashboard
from conversations import views as conversations_views

from . import pages
from .api import api

urlpatterns = [
    path("", pages.landing, name="agentflow-home"),
    path("favicon.ico", pages.favicon, name="agentflow-favicon"),
    path("admin/analytics/", include(dashboard.urls())),
    path("admin/", admin.site.urls),
    path("api/", api.urls),
    path("demo/", conversations_views.demo_page, name="agentflow-demo"),
    path("demo/chat-token", conversations_views.demo_chat_token, name="agentflow-demo-chat-token"),
]
