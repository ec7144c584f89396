from django.contrib import admin
from django.urls import path

from conversations import views as conversations_views

from .api import api

urlpatterns = [
    path("admin/", admin.site.urls),
    path("api/", api.urls),
    path("demo/", conversations_views.demo_page, name="agentflow-demo"),
    path("demo/chat-token", conversations_views.demo_chat_token, name="agentflow-demo-chat-token"),
]
