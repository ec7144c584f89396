from django.contrib import admin
from django.http import HttpRequest, HttpResponse
from django.urls import include, path


def home(request: HttpRequest) -> HttpResponse:
    """The host's own page, to show its routes and AgentFlow's live side by side."""
    return HttpResponse("hostproject home")


urlpatterns = [
    path("", home, name="home"),
    path("admin/", admin.site.urls),
    path("", include("agentflow.web.urls")),  # /api/..., /metrics, /demo/
]
