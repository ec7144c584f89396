"""AgentFlow's HTTP and WebSocket routes, for any Django project to include.

A host project mounts them in two places (docs/host-project.md)::

    # urls.py
    urlpatterns = [..., path("", include("agentflow.web.urls"))]

    # asgi.py
    from agentflow.web.routing import websocket_application
    application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application()})

This package composes the transports (the ninja routers of ``conversations`` and ``memory``, the
Channels consumers, the demo views, the health and metrics endpoints); nothing in the core, the apps
or the runtime imports it (the ``composition`` import contract). The deployment project
(``agentflow_project``) uses the very same modules.
"""
