from channels.auth import AuthMiddlewareStack
from django.urls import path

from .consumers import ChatConsumer, StaffConsumer, StaffQueueConsumer

websocket_urlpatterns = [
    path("ws/chat/", ChatConsumer.as_asgi()),
    # Staff pages authenticate with the admin session cookie (the origin check in asgi.py admits only
    # pages of this site to it: a cookie-authenticated socket must not be opened by another site).
    path("ws/staff/users/<int:user_pk>/", AuthMiddlewareStack(StaffConsumer.as_asgi())),
    path("ws/staff/queue/", AuthMiddlewareStack(StaffQueueConsumer.as_asgi())),
]
